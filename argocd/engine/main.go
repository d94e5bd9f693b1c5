// Command argocd-engine runs the ScimDirectory customizations (health check, action discovery, the
// rotate action) on Argo CD's own Lua engine, github.com/argoproj/argo-cd/v2/util/lua, for
// tests/argocd.rs. It is not built in place: hack/argocd-engine.sh builds it in a generated wrapper
// module that requires the Argo CD release (default v2.14.21, ARGOCD_ENGINE_VERSION) and repeats the
// `replace` block of that release's go.mod, and places Argo CD's stock argocd-cm.yaml beside it.
//
// The customizations are loaded the way an Argo CD configured with argocd/argocd-cm-patch.yaml loads
// them: the patch is merged (JSON merge patch, as `kubectl patch --type merge` does) into the stock
// argocd-cm of that Argo CD release, and Argo CD's SettingsManager reads the result (from a fake
// clientset) into its resource overrides.
//
//	argocd-engine version
//	    {"argoCD": "v2.14.21", "gitopsEngine": ..., "gopherLua": ..., "go": ...}
//	argocd-engine test -argocd-cm PATCH -dir CUSTOMIZATION_DIR
//	    runs every case of DIR/health_test.yaml and DIR/actions/action_test.yaml the way Argo CD's
//	    TestLuaHealthScript and TestLuaResourceActionsScript (util/lua) do, plus the production paths
//	    (below); prints one JSON line per case, {"suite", "case", "ok", "failures", ...}, after a
//	    header line {"engine": {...}}. Exits 1 if a case failed, 2 if the run itself failed.
//	argocd-engine health   -argocd-cm PATCH         < object   health as the application controller
//	                                                            computes it: {"status", "message"}
//	argocd-engine discover -argocd-cm PATCH         < object   the actions the API server lists
//	argocd-engine action   -argocd-cm PATCH -name N < object   the action as the API server runs it:
//	    [{"operation", "object", "mergePatch"}], mergePatch being the JSON merge patch it sends
//	    (null when the action changes nothing)
//
// An object is JSON or YAML.
package main

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/argoproj/gitops-engine/pkg/diff"
	"github.com/argoproj/gitops-engine/pkg/health"
	jsonpatch "github.com/evanphx/json-patch"
	log "github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"

	appsv1 "github.com/argoproj/argo-cd/v2/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v2/util/lua"
	"github.com/argoproj/argo-cd/v2/util/settings"
)

// The stock argocd-cm of the Argo CD release (manifests/base/config/argocd-cm.yaml), copied next to
// this file by hack/argocd-engine.sh.
//
//go:embed argocd-cm.yaml
var stockArgoCDConfigMap []byte

const argoCDNamespace = "argocd"

// The annotation the rotate action writes, and the placeholder its timestamp is normalized to.
const (
	rotateAnnotation = "scim.tokenops.dev/rotate"
	timePlaceholder  = "0001-01-01T00:00:00Z"
)

var started = time.Now()

func main() {
	log.SetLevel(log.WarnLevel) // the SettingsManager's informers log at info level
	if len(os.Args) < 2 {
		fail("usage: argocd-engine version | test | health | discover | action (see main.go)")
	}
	cmd, args := os.Args[1], os.Args[2:]
	flags := flag.NewFlagSet(cmd, flag.ExitOnError)
	cmPath := flags.String("argocd-cm", "", "argocd-cm patch (argocd/argocd-cm-patch.yaml)")
	dir := flags.String("dir", "", "customization directory (resource_customizations/<group>/<kind>)")
	name := flags.String("name", "", "action name")
	if err := flags.Parse(args); err != nil {
		fail(err.Error())
	}
	if cmd == "version" {
		emit(engineVersion())
		return
	}
	if *cmPath == "" {
		fail("-argocd-cm is required")
	}
	overrides, err := loadOverrides(*cmPath)
	if err != nil {
		fail(err.Error())
	}
	switch cmd {
	case "test":
		if *dir == "" {
			fail("-dir is required")
		}
		os.Exit(runTests(overrides, *dir))
	case "health":
		obj := readStdinObject()
		// The application controller (controller/health.go, setApplicationHealth).
		result, err := health.GetResourceHealth(obj, lua.ResourceHealthOverrides(overrides))
		if err != nil {
			fail(err.Error())
		}
		emit(result)
	case "discover":
		obj := readStdinObject()
		actions, err := serverAvailableActions(overrides, obj)
		if err != nil {
			fail(err.Error())
		}
		emit(actions)
	case "action":
		if *name == "" {
			fail("-name is required")
		}
		ops, err := serverRunAction(overrides, readStdinObject(), *name)
		if err != nil {
			fail(err.Error())
		}
		emit(ops)
	default:
		fail("unknown command " + cmd)
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "argocd-engine:", message)
	os.Exit(2)
}

func emit(v interface{}) {
	line, err := json.Marshal(v)
	if err != nil {
		fail(err.Error())
	}
	fmt.Println(string(line))
}

func engineVersion() map[string]string {
	v := map[string]string{"go": runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	for _, dep := range info.Deps {
		version := dep.Version
		if dep.Replace != nil {
			version = dep.Replace.Version
		}
		switch {
		case strings.HasPrefix(dep.Path, "github.com/argoproj/argo-cd/"):
			v["argoCD"] = version
		case dep.Path == "github.com/argoproj/gitops-engine":
			v["gitopsEngine"] = version
		case dep.Path == "github.com/yuin/gopher-lua":
			v["gopherLua"] = version
		}
	}
	return v
}

// loadOverrides merges the patch into the stock argocd-cm and reads it with Argo CD's SettingsManager.
func loadOverrides(patchPath string) (map[string]appsv1.ResourceOverride, error) {
	patchYAML, err := os.ReadFile(patchPath)
	if err != nil {
		return nil, err
	}
	patchJSON, err := yaml.YAMLToJSON(patchYAML)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", patchPath, err)
	}
	stockJSON, err := yaml.YAMLToJSON(stockArgoCDConfigMap)
	if err != nil {
		return nil, err
	}
	mergedJSON, err := jsonpatch.MergePatch(stockJSON, patchJSON)
	if err != nil {
		return nil, fmt.Errorf("merging %s into argocd-cm: %w", patchPath, err)
	}
	var cm corev1.ConfigMap
	if err := json.Unmarshal(mergedJSON, &cm); err != nil {
		return nil, fmt.Errorf("argocd-cm with %s merged: %w", patchPath, err)
	}
	cm.Namespace = argoCDNamespace
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mgr := settings.NewSettingsManager(ctx, fake.NewSimpleClientset(&cm), argoCDNamespace)
	return mgr.GetResourceOverrides()
}

func readStdinObject() *unstructured.Unstructured {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err.Error())
	}
	obj, err := parseObject(data)
	if err != nil {
		fail("the object on stdin: " + err.Error())
	}
	return obj
}

// parseObject reads an object as Argo CD's tests do (getObj: sigs.k8s.io/yaml into a map).
func parseObject(data []byte) (*unstructured.Unstructured, error) {
	obj := make(map[string]interface{})
	if err := yaml.Unmarshal(data, &obj); err != nil {
		return nil, err
	}
	return &unstructured.Unstructured{Object: obj}, nil
}

func readObject(path string) (*unstructured.Unstructured, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	obj, err := parseObject(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return obj, nil
}

// serverAvailableActions is the API server's getAvailableActions (server/application/application.go).
func serverAvailableActions(overrides map[string]appsv1.ResourceOverride, obj *unstructured.Unstructured) ([]appsv1.ResourceAction, error) {
	luaVM := lua.VM{ResourceOverrides: overrides}
	discoveryScripts, err := luaVM.GetResourceActionDiscovery(obj)
	if err != nil {
		return nil, fmt.Errorf("error getting Lua discovery script: %w", err)
	}
	if len(discoveryScripts) == 0 {
		return []appsv1.ResourceAction{}, nil
	}
	return luaVM.ExecuteResourceActionDiscovery(obj, discoveryScripts)
}

type operation struct {
	Operation string                 `json:"operation"`
	Object    map[string]interface{} `json:"object"`
	// The JSON merge patch the API server sends for a patch operation (patchResource); null when
	// there is nothing to patch.
	MergePatch json.RawMessage `json:"mergePatch"`
}

// serverRunAction is the API server's RunResourceAction up to the writes it makes.
func serverRunAction(overrides map[string]appsv1.ResourceOverride, liveObj *unstructured.Unstructured, name string) ([]operation, error) {
	liveObjBytes, err := json.Marshal(liveObj)
	if err != nil {
		return nil, err
	}
	luaVM := lua.VM{ResourceOverrides: overrides}
	action, err := luaVM.GetResourceAction(liveObj, name)
	if err != nil {
		return nil, fmt.Errorf("error getting Lua resource action: %w", err)
	}
	newObjects, err := executeResourceAction(luaVM, liveObj, action.ActionLua)
	if err != nil {
		return nil, fmt.Errorf("error executing Lua resource action: %w", err)
	}
	ops := []operation{}
	for _, impacted := range newObjects {
		op := operation{Operation: string(impacted.K8SOperation), Object: impacted.UnstructuredObj.Object, MergePatch: json.RawMessage("null")}
		if impacted.K8SOperation == lua.PatchOperation {
			newObjBytes, err := json.Marshal(impacted.UnstructuredObj)
			if err != nil {
				return nil, err
			}
			diffBytes, err := jsonpatch.CreateMergePatch(liveObjBytes, newObjBytes)
			if err != nil {
				return nil, fmt.Errorf("error calculating merge patch: %w", err)
			}
			if string(diffBytes) != "{}" {
				op.MergePatch = diffBytes
			}
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// ---------------------------------------------------------------------------------------------
// The test files, run as Argo CD's util/lua tests run them.
// ---------------------------------------------------------------------------------------------

// Argo CD's TestStructure / IndividualTest (health_test.go).
type healthTests struct {
	Tests []struct {
		InputPath    string              `yaml:"inputPath"`
		HealthStatus health.HealthStatus `yaml:"healthStatus"`
	} `yaml:"tests"`
}

// Argo CD's ActionTestStructure (custom_actions_test.go).
type actionTests struct {
	DiscoveryTests []struct {
		InputPath string                  `yaml:"inputPath"`
		Result    []appsv1.ResourceAction `yaml:"result"`
	} `yaml:"discoveryTests"`
	ActionTests []struct {
		Action             string `yaml:"action"`
		InputPath          string `yaml:"inputPath"`
		ExpectedOutputPath string `yaml:"expectedOutputPath"`
		InputStr           string `yaml:"input"`
	} `yaml:"actionTests"`
}

// A case's result, one JSON line.
type caseResult struct {
	Suite    string      `json:"suite"` // health, discovery, action
	Case     string      `json:"case"`
	OK       bool        `json:"ok"`
	Failures []string    `json:"failures"`
	Expected interface{} `json:"expected,omitempty"`
	// What Argo CD's own test computes (TestLuaHealthScript / TestLuaResourceActionsScript).
	Got interface{} `json:"got,omitempty"`
	// What the running Argo CD computes for the same object: the application controller's health
	// (useOpenLibs as configured in argocd-cm) and the API server's action list.
	GotArgoCD interface{} `json:"gotArgoCD,omitempty"`
	// Actions: the input, and the JSON merge patch the API server would send for the output.
	Input      interface{}     `json:"input,omitempty"`
	MergePatch json.RawMessage `json:"mergePatch,omitempty"`
}

// recorder is the testing.T that testify's assertions report to.
type recorder struct{ failures []string }

func (r *recorder) Errorf(format string, args ...interface{}) {
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
}

// result is the failures recorded, never null in JSON.
func (r *recorder) result() ([]string, bool) {
	return append([]string{}, r.failures...), len(r.failures) == 0
}

func (r *recorder) check(err error, what string) bool {
	if err != nil {
		r.failures = append(r.failures, fmt.Sprintf("%s: %v", what, err))
		return false
	}
	return true
}

func readYAML(path string, into interface{}) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(data, into); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func runTests(overrides map[string]appsv1.ResourceOverride, dir string) int {
	emit(map[string]interface{}{"engine": engineVersion()})
	var results []caseResult
	var ht healthTests
	if err := readYAML(filepath.Join(dir, "health_test.yaml"), &ht); err != nil {
		fail(err.Error())
	}
	for _, test := range ht.Tests {
		results = append(results, healthCase(overrides, dir, test.InputPath, test.HealthStatus))
	}
	actionsDir := filepath.Join(dir, "actions")
	var at actionTests
	if err := readYAML(filepath.Join(actionsDir, "action_test.yaml"), &at); err != nil {
		fail(err.Error())
	}
	for _, test := range at.DiscoveryTests {
		results = append(results, discoveryCase(overrides, actionsDir, test.InputPath, test.Result))
	}
	for _, test := range at.ActionTests {
		results = append(results, actionCase(overrides, actionsDir, test.Action, test.InputPath, test.ExpectedOutputPath))
	}
	code := 0
	for _, r := range results {
		if !r.OK {
			code = 1
		}
		emit(r)
	}
	return code
}

// healthCase: TestLuaHealthScript's body, then the application controller's path.
func healthCase(overrides map[string]appsv1.ResourceOverride, dir, inputPath string, expected health.HealthStatus) caseResult {
	r := &recorder{}
	res := caseResult{Suite: "health", Case: inputPath, Expected: expected}
	obj, err := readObject(filepath.Join(dir, inputPath))
	if r.check(err, "reading the input") {
		vm := lua.VM{UseOpenLibs: true, ResourceOverrides: overrides}
		script, _, err := vm.GetHealthScript(obj)
		switch {
		case err != nil:
			r.check(err, "GetHealthScript")
		case script == "":
			r.Errorf("no health script for %s in argocd-cm", lua.GetConfigMapKey(obj.GroupVersionKind()))
		default:
			result, err := vm.ExecuteHealthLua(obj, script)
			if r.check(err, "ExecuteHealthLua (TestLuaHealthScript, useOpenLibs: true)") {
				res.Got = result
				assert.Equal(r, &expected, result, "TestLuaHealthScript")
			}
		}
		// As the running controller evaluates it: useOpenLibs from argocd-cm (false unless set).
		live, err := health.GetResourceHealth(obj, lua.ResourceHealthOverrides(overrides))
		if r.check(err, "health.GetResourceHealth (application controller)") {
			res.GotArgoCD = live
			assert.Equal(r, &expected, live, "application controller")
		}
	}
	res.Failures, res.OK = r.result()
	return res
}

// discoveryCase: TestLuaResourceActionsScript's discovery body (every discovered action is expected),
// plus the converse (every expected action is discovered), then the API server's path.
func discoveryCase(overrides map[string]appsv1.ResourceOverride, dir, inputPath string, expected []appsv1.ResourceAction) caseResult {
	r := &recorder{}
	res := caseResult{Suite: "discovery", Case: inputPath, Expected: expected}
	obj, err := readObject(filepath.Join(dir, inputPath))
	if r.check(err, "reading the input") {
		vm := lua.VM{UseOpenLibs: true, ResourceOverrides: overrides}
		discoveryLua, err := vm.GetResourceActionDiscovery(obj)
		if r.check(err, "GetResourceActionDiscovery") {
			result, err := vm.ExecuteResourceActionDiscovery(obj, discoveryLua)
			if r.check(err, "ExecuteResourceActionDiscovery") {
				res.Got = result
				for i := range result {
					assert.Contains(r, expected, result[i], "TestLuaResourceActionsScript")
				}
				assert.ElementsMatch(r, expected, result, "every expected action is discovered")
			}
		}
		listed, err := serverAvailableActions(overrides, obj)
		if r.check(err, "the API server's action list") {
			res.GotArgoCD = listed
			assert.ElementsMatch(r, expected, listed, "the API server's action list")
		}
	}
	res.Failures, res.OK = r.result()
	return res
}

// actionCase: TestLuaResourceActionsScript's action body (gitops-engine's diff with the test
// normalizer), plus an exact comparison (that diff ignores fields the expected output lacks) and the
// merge patch the API server would send.
func actionCase(overrides map[string]appsv1.ResourceOverride, dir, action, inputPath, expectedOutputPath string) (res caseResult) {
	r := &recorder{}
	res = caseResult{Suite: "action", Case: "actions/" + action + "/" + inputPath}
	defer func() {
		res.Failures, res.OK = r.result()
	}()
	sourceObj, err := readObject(filepath.Join(dir, inputPath))
	if !r.check(err, "reading the input") {
		return res
	}
	res.Input = sourceObj.Object
	sourceBytes, err := json.Marshal(sourceObj)
	if !r.check(err, "encoding the input") {
		return res
	}
	// Without open libraries, "to ensure tests reflect the same privileges that API server has".
	vm := lua.VM{ResourceOverrides: overrides}
	def, err := vm.GetResourceAction(sourceObj, action)
	if !r.check(err, "GetResourceAction") {
		return res
	}
	impactedResources, err := executeResourceAction(vm, sourceObj, def.ActionLua)
	if !r.check(err, "ExecuteResourceAction") {
		return res
	}
	expectedObjects, err := expectedObjectList(filepath.Join(dir, expectedOutputPath))
	if !r.check(err, "reading the expected output") {
		return res
	}
	if len(impactedResources) == 0 {
		r.Errorf("the action returned no resource")
	}
	var got []interface{}
	var expected []interface{}
	for _, impactedResource := range impactedResources {
		result := impactedResource.UnstructuredObj
		got = append(got, result.Object)
		expectedObj := findFirstMatchingItem(expectedObjects.Items, func(u unstructured.Unstructured) bool {
			return u.GroupVersionKind() == result.GroupVersionKind() && u.GetName() == result.GetName() && u.GetNamespace() == result.GetNamespace()
		})
		if !assert.NotNil(r, expectedObj, "no object in %s matches the action's %s %s", expectedOutputPath, result.GetKind(), result.GetName()) {
			continue
		}
		expected = append(expected, expectedObj.Object)
		switch impactedResource.K8SOperation {
		case lua.PatchOperation:
			assert.EqualValues(r, sourceObj.GroupVersionKind(), result.GroupVersionKind())
			assert.EqualValues(r, sourceObj.GetName(), result.GetName())
			assert.EqualValues(r, sourceObj.GetNamespace(), result.GetNamespace())
			resultBytes, err := json.Marshal(result)
			if r.check(err, "encoding the output") {
				patch, err := jsonpatch.CreateMergePatch(sourceBytes, resultBytes)
				if r.check(err, "the merge patch") {
					res.MergePatch = patch
				}
			}
		case lua.CreateOperation:
			r.Errorf("the action creates a %s; the ScimDirectory actions only patch", result.GetKind())
		}
		diffResult, err := diff.Diff(expectedObj, result, diff.WithNormalizer(testNormalizer{}))
		if r.check(err, "diff.Diff") && diffResult.Modified {
			r.Errorf("Output does not match input (TestLuaResourceActionsScript):\n%s", yamlDiff(expectedObj, result))
		}
		// Exact: the same JSON after normalization, numbers compared as JSON numbers.
		want, errW := normalizedJSON(expectedObj)
		have, errH := normalizedJSON(result)
		if r.check(errW, "normalizing the expected output") && r.check(errH, "normalizing the output") && !reflect.DeepEqual(want, have) {
			r.Errorf("output differs from %s (exact comparison):\n%s", expectedOutputPath, yamlDiff(expectedObj, result))
		}
	}
	res.Expected, res.Got = expected, got
	return res
}

// Argo CD's getExpectedObjectList: an old-style single object, or a new-style list of
// {unstructuredObj: ...}.
func expectedObjectList(path string) (*unstructured.UnstructuredList, error) {
	yamlBytes, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	list := &unstructured.UnstructuredList{}
	if len(yamlBytes) > 0 && bytes.NewBuffer(yamlBytes).String()[0] == '-' {
		var objList []map[string]interface{}
		if err := yaml.Unmarshal(yamlBytes, &objList); err != nil {
			return nil, err
		}
		for _, obj := range objList {
			u, ok := obj["unstructuredObj"].(map[string]interface{})
			if !ok {
				return nil, errors.New("wrong type of unstructuredObj")
			}
			list.Items = append(list.Items, unstructured.Unstructured{Object: u})
		}
		return list, nil
	}
	obj := make(map[string]interface{})
	if err := yaml.Unmarshal(yamlBytes, &obj); err != nil {
		return nil, err
	}
	list.Items = []unstructured.Unstructured{{Object: obj}}
	return list, nil
}

func findFirstMatchingItem(items []unstructured.Unstructured, f func(unstructured.Unstructured) bool) *unstructured.Unstructured {
	for i := range items {
		if f(items[i]) {
			return &items[i]
		}
	}
	return nil
}

func normalizedJSON(obj *unstructured.Unstructured) (interface{}, error) {
	c := obj.DeepCopy()
	if err := (testNormalizer{}).Normalize(c); err != nil {
		return nil, err
	}
	data, err := json.Marshal(c.Object)
	if err != nil {
		return nil, err
	}
	var v interface{}
	err = json.Unmarshal(data, &v)
	return v, err
}

func yamlDiff(expected, got *unstructured.Unstructured) string {
	e, _ := yaml.Marshal(expected.Object)
	g, _ := yaml.Marshal(got.Object)
	return "--- expected\n" + string(e) + "--- got\n" + string(g)
}

// rfc3339Second matches what the rotate action writes: a UTC second, and a counter when that second
// was taken.
var rfc3339Second = regexp.MustCompile(`^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)(-[0-9]+)?$`)

// testNormalizer is Argo CD's (custom_actions_test.go), which replaces the timestamps that actions
// write with a placeholder on both sides of the comparison, extended by the same for ScimDirectory:
// the rotate annotation's time becomes 0001-01-01T00:00:00Z, its counter suffix is kept. Only a time
// from this run is normalized, so an action writing a stale or malformed value still fails.
type testNormalizer struct{}

func (t testNormalizer) Normalize(un *unstructured.Unstructured) error {
	if un == nil {
		return nil
	}
	if un.GetKind() == "ScimDirectory" {
		annotations := un.GetAnnotations()
		if m := rfc3339Second.FindStringSubmatch(annotations[rotateAnnotation]); m != nil {
			at, err := time.Parse(time.RFC3339, m[1])
			if err == nil && !at.Before(started.Truncate(time.Second)) && !at.After(time.Now()) {
				annotations[rotateAnnotation] = timePlaceholder + m[2]
				un.SetAnnotations(annotations)
			}
		}
	}
	return argoCDTestNormalizer(un)
}

// argoCDTestNormalizer is testNormalizer.Normalize of Argo CD v2.14's util/lua/custom_actions_test.go,
// verbatim.
func argoCDTestNormalizer(un *unstructured.Unstructured) error {
	switch un.GetKind() {
	case "Job":
		err := unstructured.SetNestedField(un.Object, map[string]interface{}{"name": "not sure why this works"}, "metadata")
		if err != nil {
			return fmt.Errorf("failed to normalize Job: %w", err)
		}
	}
	switch un.GetKind() {
	case "DaemonSet", "Deployment", "StatefulSet":
		err := unstructured.SetNestedStringMap(un.Object, map[string]string{"kubectl.kubernetes.io/restartedAt": "0001-01-01T00:00:00Z"}, "spec", "template", "metadata", "annotations")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
	}
	switch un.GetKind() {
	case "Deployment":
		err := unstructured.SetNestedField(un.Object, nil, "status")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
		err = unstructured.SetNestedField(un.Object, nil, "metadata", "creationTimestamp")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
		err = unstructured.SetNestedField(un.Object, nil, "metadata", "generation")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
	case "Rollout":
		err := unstructured.SetNestedField(un.Object, nil, "spec", "restartAt")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
	case "ExternalSecret", "PushSecret":
		err := unstructured.SetNestedStringMap(un.Object, map[string]string{"force-sync": "0001-01-01T00:00:00Z"}, "metadata", "annotations")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
	case "Workflow":
		err := unstructured.SetNestedField(un.Object, nil, "metadata", "resourceVersion")
		if err != nil {
			return fmt.Errorf("failed to normalize Rollout: %w", err)
		}
		err = unstructured.SetNestedField(un.Object, nil, "metadata", "uid")
		if err != nil {
			return fmt.Errorf("failed to normalize Rollout: %w", err)
		}
		err = unstructured.SetNestedField(un.Object, nil, "metadata", "annotations", "workflows.argoproj.io/scheduled-time")
		if err != nil {
			return fmt.Errorf("failed to normalize Rollout: %w", err)
		}
	case "HelmRelease", "ImageRepository", "ImageUpdateAutomation", "Kustomization", "Receiver", "Bucket", "GitRepository", "HelmChart", "HelmRepository", "OCIRepository":
		err := unstructured.SetNestedStringMap(un.Object, map[string]string{"reconcile.fluxcd.io/requestedAt": "By Argo CD at: 0001-01-01T00:00:00"}, "metadata", "annotations")
		if err != nil {
			return fmt.Errorf("failed to normalize %s: %w", un.GetKind(), err)
		}
	}
	return nil
}
