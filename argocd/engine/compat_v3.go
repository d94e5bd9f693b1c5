//go:build argocd_v3

package main

import (
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/argoproj/argo-cd/v2/util/lua"
)

// executeResourceAction is VM.ExecuteResourceAction of Argo CD v3, which takes the action's
// parameters (none here). hack/argocd-engine.sh rewrites the import path to .../v3/... and builds
// with -tags argocd_v3.
func executeResourceAction(vm lua.VM, obj *unstructured.Unstructured, script string) ([]lua.ImpactedResource, error) {
	return vm.ExecuteResourceAction(obj, script, nil)
}
