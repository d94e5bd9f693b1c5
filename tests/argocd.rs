//! Runs the Argo CD resource customizations in `argocd/resource_customizations/` (health check,
//! action discovery, the `rotate` action) on Argo CD's own Lua engine: `hack/argocd-engine.sh`
//! builds `argocd/engine/main.go` against `github.com/argoproj/argo-cd/v2/util/lua` of Argo CD
//! v2.14.21 (`ARGOCD_ENGINE_VERSION` picks another release) from the Go module proxy, once, into the
//! cache. The driver loads the scripts from `argocd/argocd-cm-patch.yaml` through Argo CD's own
//! SettingsManager, as an Argo CD with that patch applied does.
//!
//! - Every case of `health_test.yaml` and `actions/action_test.yaml` runs as Argo CD's own
//!   `TestLuaHealthScript` / `TestLuaResourceActionsScript` run theirs, and as the running Argo CD
//!   evaluates the object (the application controller's health, the API server's action list and
//!   merge patch); any mismatch fails.
//! - The rotate action on the real clock (fresh RFC 3339 values, a counter within one second).
//! - The health check and the rotate action on live directories that the operator reconciles on the
//!   real control plane: the status shapes it really writes, the merge patch Argo CD's server sends.
//! - `argocd/argocd-cm-patch.yaml` embeds exactly the script files.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value as Json, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const GROUP_KIND: &str = "scim.tokenops.dev/ScimDirectory";
const ROTATE_ANNOTATION: &str = "scim.tokenops.dev/rotate";
const PATCH_FILE: &str = "argocd/argocd-cm-patch.yaml";
/// Set to rewrite `argocd/argocd-cm-patch.yaml` from the scripts instead of failing when it is stale.
const WRITE_ENV: &str = "SCIM_ARGOCD_CM_WRITE";

fn customization_dir() -> PathBuf {
    Path::new(ROOT).join("argocd/resource_customizations").join(GROUP_KIND)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn read_yaml(path: &Path) -> Json {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn annotation<'a>(obj: &'a Json, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/annotations").and_then(|a| a.get(key)).and_then(Json::as_str)
}

/// The `field` of every entry of `list` in a test file (`inputPath` of `tests`, ...).
fn paths(file: &Json, list: &str, field: &str) -> Vec<String> {
    file[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} list"))
        .iter()
        .map(|t| t[field].as_str().unwrap_or_else(|| panic!("an entry of {list} has no {field}")).to_owned())
        .collect()
}

fn health_test_file() -> Json {
    read_yaml(&customization_dir().join("health_test.yaml"))
}

fn action_test_file() -> Json {
    read_yaml(&customization_dir().join("actions/action_test.yaml"))
}

/// Paths of the YAML files under `dir/testdata`, relative to `dir`.
fn testdata_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("testdata"))
        .unwrap()
        .map(|e| format!("testdata/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".yaml"))
        .collect()
}

fn action_dirs(actions: &Path) -> BTreeSet<String> {
    std::fs::read_dir(actions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("action.lua").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Argo CD's engine: the driver built by hack/argocd-engine.sh.
// ---------------------------------------------------------------------------------------------

/// The driver's path; built on first use (minutes on a cold cache, its progress on stderr).
fn engine() -> &'static Path {
    static ENGINE: OnceLock<PathBuf> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let script = Path::new(ROOT).join("hack/argocd-engine.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "hack/argocd-engine.sh could not provide Argo CD's Lua engine (see its message above); \
             it needs Go and the Go module proxy"
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap_or_default());
        assert!(path.is_file(), "hack/argocd-engine.sh printed {}, which does not exist", path.display());
        path
    })
}

fn run_engine(args: &[&str], stdin: &[u8]) -> Output {
    let patch = Path::new(ROOT).join(PATCH_FILE);
    let mut child = Command::new(engine())
        .args(args)
        .arg("-argocd-cm")
        .arg(&patch)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start argocd-engine");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// `argocd-engine <command> [args]` on `obj`, its JSON answer.
fn engine_on(command: &str, args: &[&str], obj: &Json) -> Json {
    let mut all = vec![command];
    all.extend_from_slice(args);
    let out = run_engine(&all, obj.to_string().as_bytes());
    assert!(
        out.status.success(),
        "argocd-engine {}: {}\non {obj}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Health as Argo CD's application controller computes it: (status, message).
fn health(obj: &Json) -> (String, String) {
    let h = engine_on("health", &[], obj);
    let field = |k: &str| h.get(k).and_then(Json::as_str).unwrap_or_default().to_owned();
    (field("status"), field("message"))
}

/// The rotate action as Argo CD's API server runs it: the returned object and the JSON merge patch
/// it sends to the API server.
fn rotate(obj: &Json) -> (Json, Json) {
    let ops = engine_on("action", &["-name", "rotate"], obj);
    let ops = ops.as_array().expect("a list of operations");
    assert_eq!(ops.len(), 1, "rotate returns the directory only: {ops:?}");
    assert_eq!(ops[0]["operation"], "patch");
    (ops[0]["object"].clone(), ops[0]["mergePatch"].clone())
}

/// The patch that sets the rotate annotation to `value` and changes nothing else.
fn annotation_only(value: &str) -> Json {
    json!({"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
}

fn now_second() -> i64 {
    Timestamp::now().as_second()
}

/// A fresh request value: RFC 3339 UTC of a second within `range`, optionally with a `-N` counter.
fn assert_fresh(value: &str, range: std::ops::RangeInclusive<i64>) {
    let base = value.split_once("Z-").map_or(value, |(t, _)| &value[..t.len() + 1]);
    let at: Timestamp = base.parse().unwrap_or_else(|e| panic!("{value} is not RFC 3339: {e}"));
    assert!(base.ends_with('Z') && base.len() == 20, "{value} is not a UTC second");
    assert!(range.contains(&at.as_second()), "{value} is not the current time");
}

// ---------------------------------------------------------------------------------------------
// The test files on Argo CD's engine.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_health_discovery_and_action_case_passes_on_argo_cds_engine() {
    assert!(
        read(&Path::new(ROOT).join(PATCH_FILE)) == expected_patch(),
        "{PATCH_FILE} is stale, and the engine runs the scripts from it: run `{WRITE_ENV}=1 cargo test --test argocd`"
    );
    let dir = customization_dir();
    let before = now_second();
    let out = run_engine(&["test", "-dir", dir.to_str().unwrap()], b"");
    let after = now_second();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 1)), "argocd-engine test failed to run: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines().map(|l| serde_json::from_str::<Json>(l).unwrap_or_else(|e| panic!("{e}: {l}")));
    let engine = lines.next().expect("a header line")["engine"].clone();
    let cases: Vec<Json> = lines.collect();

    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c["ok"] != true)
        .map(|c| {
            let failures: Vec<&str> = c["failures"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
            format!("{} {}:\n  {}", c["suite"], c["case"], failures.join("\n  "))
        })
        .collect();
    assert!(failed.is_empty(), "on Argo CD's engine ({engine}):\n{}", failed.join("\n"));
    assert!(out.status.success(), "argocd-engine test exited with {} although every case passed", out.status);

    // Every case of the files ran, once: nothing was skipped.
    let ran = |suite: &str| -> Vec<String> {
        cases.iter().filter(|c| c["suite"] == suite).map(|c| c["case"].as_str().unwrap().to_owned()).collect()
    };
    let actions = action_test_file();
    assert_eq!(ran("health"), paths(&health_test_file(), "tests", "inputPath"));
    assert_eq!(ran("discovery"), paths(&actions, "discoveryTests", "inputPath"));
    let action_cases: Vec<String> = actions["actionTests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("actions/{}/{}", t["action"].as_str().unwrap(), t["inputPath"].as_str().unwrap()))
        .collect();
    assert_eq!(ran("action"), action_cases);
    assert_eq!(cases.len(), ran("health").len() + ran("discovery").len() + action_cases.len());

    // What Argo CD's server sends for each action case: a merge patch that sets the annotation to a
    // new value and nothing else, so no field that Git manages (spec, labels, other annotations) can
    // drift.
    for case in cases.iter().filter(|c| c["suite"] == "action") {
        let input = &case["input"];
        let value = case.pointer("/mergePatch/metadata/annotations").and_then(|a| a[ROTATE_ANNOTATION].as_str());
        let value = value.unwrap_or_else(|| panic!("{}: no rotate annotation in {}", case["case"], case["mergePatch"]));
        assert_eq!(case["mergePatch"], annotation_only(value), "{} changes more than the annotation", case["case"]);
        assert_fresh(value, before..=after);
        assert_ne!(Some(value), annotation(input, ROTATE_ANNOTATION));
        assert_ne!(Some(value), input.pointer("/status/lastRotationRequest").and_then(Json::as_str));
    }
    eprintln!(
        "Argo CD {} (gitops-engine {}, gopher-lua {}): {} health, {} discovery and {} action cases passed",
        engine["argoCD"].as_str().unwrap_or("?"),
        engine["gitopsEngine"].as_str().unwrap_or("?"),
        engine["gopherLua"].as_str().unwrap_or("?"),
        ran("health").len(),
        ran("discovery").len(),
        action_cases.len()
    );
}

/// The Ready reasons the operator writes (the API's `ReadyReason`, the contract the health check reads).
fn operator_ready_reasons() -> BTreeSet<String> {
    scim_token_operator::api::ReadyReason::ALL.iter().map(|r| r.as_str().to_owned()).collect()
}

#[test]
fn health_tests_cover_every_status_reason_and_input() {
    let dir = customization_dir();
    let file = health_test_file();
    let tests = file["tests"].as_array().unwrap();
    let statuses: BTreeSet<&str> = tests.iter().filter_map(|t| t["healthStatus"]["status"].as_str()).collect();
    for status in ["Healthy", "Progressing", "Degraded"] {
        assert!(statuses.contains(status), "no health test expects {status}");
    }
    // Every Ready reason the operator writes appears in some input.
    let inputs = paths(&file, "tests", "inputPath");
    let reasons: BTreeSet<String> = inputs
        .iter()
        .filter_map(|p| read_yaml(&dir.join(p)).pointer("/status/conditions/0/reason").cloned())
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    for reason in &operator_ready_reasons() {
        assert!(reasons.contains(reason), "no health test input has Ready reason {reason} (ReadyReason::ALL has it)");
    }
    // An overlap window shows in a case.
    assert!(
        inputs.iter().any(|p| read_yaml(&dir.join(p)).pointer("/status/previousTokenValidUntil").is_some()),
        "no health test input is inside a rotation overlap"
    );
    // Every input is used, and used once.
    let unique: BTreeSet<String> = inputs.iter().cloned().collect();
    assert_eq!(unique.len(), inputs.len(), "an input is listed twice in health_test.yaml");
    assert_eq!(unique, testdata_files(&dir), "testdata/ and health_test.yaml disagree");
}

#[test]
fn action_tests_cover_every_action_and_input() {
    let dir = customization_dir().join("actions");
    let file = action_test_file();
    let scripts = action_dirs(&dir);
    // Every discovered action has a script, and every script is discoverable.
    for test in file["discoveryTests"].as_array().unwrap() {
        let names: BTreeSet<String> =
            test["result"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_owned()).collect();
        assert_eq!(names, scripts, "actions/*/action.lua and the discovered actions differ");
    }
    let tested: BTreeSet<String> = paths(&file, "actionTests", "action").into_iter().collect();
    assert_eq!(tested, scripts, "every action needs an action test");
    let used: BTreeSet<String> = paths(&file, "actionTests", "inputPath")
        .into_iter()
        .chain(paths(&file, "actionTests", "expectedOutputPath"))
        .chain(paths(&file, "discoveryTests", "inputPath"))
        .collect();
    assert_eq!(used, testdata_files(&dir), "actions/testdata/ and action_test.yaml disagree");
}

// ---------------------------------------------------------------------------------------------
// The rotate action on the real clock.
// ---------------------------------------------------------------------------------------------

#[test]
fn rotate_writes_a_fresh_rfc3339_timestamp_on_the_real_clock() {
    let dir = customization_dir().join("actions");
    for input in paths(&action_test_file(), "actionTests", "inputPath") {
        let input = read_yaml(&dir.join(input));
        let before = now_second();
        let (output, patch) = rotate(&input);
        let after = now_second();
        let value = annotation(&output, ROTATE_ANNOTATION).unwrap();
        assert!(!value.contains("Z-"), "{value}: no counter needed");
        assert_fresh(value, before..=after);
        assert_ne!(Some(value), annotation(&input, ROTATE_ANNOTATION));
        assert_eq!(patch, annotation_only(value));
    }
}

#[test]
fn rotate_twice_in_one_second_appends_a_counter() {
    // The current second is taken by the annotation (a click a moment ago) and "-2" by the last
    // handled request: the next free value is "-3". Retried if the clock turns a second meanwhile.
    let input = read_yaml(&customization_dir().join("actions/testdata/directory-requested.yaml"));
    for _ in 0..10 {
        let now = Timestamp::from_second(now_second()).unwrap().to_string();
        let mut taken = input.clone();
        taken["metadata"]["annotations"][ROTATE_ANNOTATION] = json!(now);
        taken["status"]["lastRotationRequest"] = json!(format!("{now}-2"));
        let (output, patch) = rotate(&taken);
        let value = annotation(&output, ROTATE_ANNOTATION).unwrap().to_owned();
        if !value.starts_with(&now) {
            continue;
        }
        assert_eq!(value, format!("{now}-3"));
        assert_eq!(patch, annotation_only(&value));
        return;
    }
    panic!("the clock turned a second during every attempt");
}

#[test]
fn rotate_then_health_is_progressing_until_the_operator_handles_the_request() {
    // The two scripts agree: a rotation requested through the action shows as Progressing, and as
    // Healthy once the operator has recorded the value in status.lastRotationRequest.
    let input = read_yaml(&customization_dir().join("testdata/healthy_issued.yaml"));
    assert_eq!(health(&input).0, "Healthy");
    let (mut output, _) = rotate(&input);
    let value = annotation(&output, ROTATE_ANNOTATION).unwrap().to_owned();
    assert_eq!(
        health(&output),
        ("Progressing".into(), format!("Waiting for the operator to rotate the token ({ROTATE_ANNOTATION}={value})"))
    );
    output["status"]["lastRotationRequest"] = json!(value);
    assert_eq!(health(&output), ("Healthy".into(), "issued the first token".into()));
}

#[test]
fn an_identity_provider_condition_of_an_older_generation_is_read_as_ready_is() {
    // Every reason of IdentityProviderSynced, written for the current generation, for an older one
    // (as a number and as a string), and without observedGeneration (status.observedGeneration stands
    // in): an older one is Progressing whatever the reason, exactly as a stale Ready is.
    use scim_token_operator::entra::reason;
    let synced = read_yaml(&customization_dir().join("testdata/healthy_entraSynced.yaml"));
    let with = |reason: &str, idp_generation: Option<Json>, status_generation: i64| {
        let mut obj = synced.clone();
        obj["metadata"]["generation"] = json!(2);
        obj["status"]["observedGeneration"] = json!(status_generation);
        obj["status"]["conditions"][0]["observedGeneration"] = json!(2);
        let idp = &mut obj["status"]["conditions"][1];
        assert_eq!(idp["type"], "IdentityProviderSynced");
        idp["reason"] = json!(reason);
        idp["status"] = json!(if reason == reason::SYNCED { "True" } else { "False" });
        match idp_generation {
            Some(g) => idp["observedGeneration"] = g,
            None => {
                idp.as_object_mut().unwrap().remove("observedGeneration");
            }
        }
        obj
    };
    let stale = (
        "Progressing".to_owned(),
        "Waiting for the operator to reconcile generation 2 with Microsoft Entra ID (the IdentityProviderSynced \
         condition is for generation 1)"
            .to_owned(),
    );
    for r in reason::ALL {
        let current = health(&with(r, Some(json!(2)), 2)).0;
        let expected = match r {
            reason::SYNCED => "Healthy",
            reason::PUSH_PENDING | reason::AWAITING_SYNC => "Progressing",
            _ => "Degraded",
        };
        assert_eq!(current, expected, "{r} for the current generation");
        assert_eq!(health(&with(r, None, 2)).0, expected, "{r} without observedGeneration, status current");
        for older in [json!(1), json!("1")] {
            assert_eq!(health(&with(r, Some(older.clone()), 2)), stale, "{r} for generation {older}");
        }
        assert_eq!(health(&with(r, None, 1)), stale, "{r} without observedGeneration, status for generation 1");
        // Ready for an older generation says the same, whatever the identity provider's condition.
        let mut ready_stale = with(r, Some(json!(2)), 2);
        ready_stale["status"]["conditions"][0]["observedGeneration"] = json!(1);
        assert_eq!(
            health(&ready_stale),
            (
                "Progressing".to_owned(),
                "Waiting for the operator to reconcile generation 2 (the status is for generation 1)".to_owned()
            )
        );
    }
}

// ---------------------------------------------------------------------------------------------
// argocd/argocd-cm-patch.yaml
// ---------------------------------------------------------------------------------------------

fn config_map_key(kind: &str) -> String {
    format!("resource.customizations.{kind}.{}", GROUP_KIND.replace('/', "_"))
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| if l.is_empty() { "\n".to_owned() } else { format!("{pad}{l}\n") }).collect()
}

/// The patch as it must be: the scripts embedded verbatim as YAML block scalars.
fn expected_patch() -> String {
    let dir = customization_dir();
    let mut out = String::from(
        "# Installs the scim-token-operator customizations for scim.tokenops.dev/ScimDirectory into Argo CD:\n\
         # the health check and the \"rotate\" action. See docs/gitops.md.\n\
         #\n\
         #   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm-patch.yaml\n\
         #\n\
         # Generated from argocd/resource_customizations/scim.tokenops.dev/ScimDirectory/ by\n\
         # `SCIM_ARGOCD_CM_WRITE=1 cargo test --test argocd`; that test fails when this file is stale.\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  name: argocd-cm\n\
         data:\n",
    );
    out.push_str(&format!("  {}: |\n", config_map_key("health")));
    out.push_str(&indent(&read(&dir.join("health.lua")), 4));
    out.push_str(&format!("  {}: |\n", config_map_key("actions")));
    out.push_str("    discovery.lua: |\n");
    out.push_str(&indent(&read(&dir.join("actions/discovery.lua")), 6));
    out.push_str("    definitions:\n");
    for name in action_dirs(&dir.join("actions")) {
        out.push_str(&format!("    - name: {name}\n      action.lua: |\n"));
        out.push_str(&indent(&read(&dir.join("actions").join(&name).join("action.lua")), 8));
    }
    out
}

#[test]
fn argocd_cm_patch_embeds_exactly_the_scripts() {
    let path = Path::new(ROOT).join(PATCH_FILE);
    let expected = expected_patch();
    if std::env::var_os(WRITE_ENV).is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = read(&path);

    // Read as a YAML reader reads it, independently of how the file was written.
    let dir = customization_dir();
    let cm: Json = serde_yaml::from_str(&actual).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 2, "the patch should carry only the two customizations");
    assert_eq!(data[&config_map_key("health")], read(&dir.join("health.lua")), "health.lua differs in {PATCH_FILE}");
    let actions: Json = serde_yaml::from_str(data[&config_map_key("actions")].as_str().unwrap()).unwrap();
    assert_eq!(
        actions["discovery.lua"],
        read(&dir.join("actions/discovery.lua")),
        "discovery.lua differs in {PATCH_FILE}"
    );
    let definitions: BTreeMap<String, String> = actions["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap().to_owned(), d["action.lua"].as_str().unwrap().to_owned()))
        .collect();
    let scripts: BTreeMap<String, String> = action_dirs(&dir.join("actions"))
        .into_iter()
        .map(|name| {
            let script = read(&dir.join("actions").join(&name).join("action.lua"));
            (name, script)
        })
        .collect();
    assert_eq!(definitions, scripts, "action definitions differ in {PATCH_FILE}");

    assert!(actual == expected, "{PATCH_FILE} is stale: run `{WRITE_ENV}=1 cargo test --test argocd` to regenerate it");
}

#[test]
fn example_applications_match_the_repository() {
    let dir = Path::new(ROOT).join("examples/argocd");
    let chart = read_yaml(&dir.join("application-chart.yaml"));
    let directories = read_yaml(&dir.join("application-directories.yaml"));
    for app in [&chart, &directories] {
        assert_eq!(app["apiVersion"], "argoproj.io/v1alpha1");
        assert_eq!(app["kind"], "Application");
        let repo = app["spec"]["source"]["repoURL"].as_str().unwrap();
        assert!(repo.contains("REPLACE-ME"), "repoURL {repo} should stay a marked placeholder");
        let options = app["spec"]["syncPolicy"]["syncOptions"].as_array().unwrap();
        assert!(options.contains(&json!("ServerSideApply=true")), "{options:?}");
        // A resources finalizer would delete the CRD (and every token Secret) with the Application.
        assert!(app.pointer("/metadata/finalizers").is_none());
    }
    let chart_path = chart["spec"]["source"]["path"].as_str().unwrap();
    assert!(Path::new(ROOT).join(chart_path).join("Chart.yaml").is_file(), "{chart_path} is not the chart");
    assert_eq!(directories["spec"]["syncPolicy"]["automated"]["prune"], false);
}

// ---------------------------------------------------------------------------------------------
// The scripts on live objects: the status shapes the operator really writes, on the real control plane
// ---------------------------------------------------------------------------------------------

mod support;

#[tokio::test]
async fn health_and_rotate_on_live_directories() {
    use kube::api::{Patch, PatchParams, PostParams};
    use support::{Env, wait_for};

    let env = Env::new("argocd").await;
    // The object as Argo CD gets it from the API server: unstructured, every field as stored.
    let live = |name: &str| {
        let (ok, out, err) = env.kubectl(&["get", "scimdirectories.scim.tokenops.dev", name, "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Json>(&out).unwrap()
    };
    let ready_message =
        |obj: &Json| obj.pointer("/status/conditions/0/message").and_then(Json::as_str).unwrap().to_owned();
    // The rotate action, sent as Argo CD's server sends it: the merge patch of the returned object.
    let run_rotate = |name: &'static str| {
        let before = live(name);
        let (after, patch) = rotate(&before);
        let requested = annotation(&after, ROTATE_ANNOTATION).unwrap().to_owned();
        assert_eq!(patch, annotation_only(&requested));
        let dirs = env.dirs();
        async move {
            dirs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            requested
        }
    };
    let handled = |name: &'static str, requested: String| {
        let dirs = env.dirs();
        async move {
            wait_for("the rotation request handled", Duration::from_secs(60), || async {
                let d = dirs.get(name).await.unwrap();
                (d.status?.last_rotation_request.as_deref() == Some(requested.as_str())).then_some(())
            })
            .await
        }
    };
    let mut op = env.operator(&[]);

    let (ok, _, err) = env.apply(include_str!("../examples/basic.yaml"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    assert_eq!(health(&live("acme")), ("Healthy".into(), "issued the first token".into()));

    // With the operator stopped, a spec change and a rotation request stay pending: Progressing.
    assert!(op.terminate().await.success());
    env.dirs()
        .patch("acme", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
        .await
        .unwrap();
    let (status, message) = health(&live("acme"));
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation 2"), "{message}");
    let requested = run_rotate("acme").await;
    assert_eq!(health(&live("acme")).0, "Progressing");

    // The operator handles both with one rotation; the application turns Healthy.
    let _op = env.operator(&[]);
    handled("acme", requested).await;
    let (status, message) = health(&live("acme"));
    assert_eq!(status, "Healthy", "{message}");

    // A rotation with an overlap window: Healthy, and the message says until when the old token works.
    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: overlap\nspec:\n  rotationOverlap: 1h\n",
    );
    assert!(ok, "{err}");
    env.wait_ready_reason("overlap", "TokenIssued").await;
    let requested = run_rotate("overlap").await;
    handled("overlap", requested).await;
    let obj = live("overlap");
    let until = obj.pointer("/status/previousTokenValidUntil").and_then(Json::as_str).expect("an overlap").to_owned();
    assert_eq!(
        health(&obj),
        ("Healthy".into(), format!("{}; the previous token is still valid until {until}", ready_message(&obj)))
    );

    // Problems the operator cannot solve on its own: Degraded, with the condition's message.
    let foreign: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({ "metadata": { "name": "taken" }, "stringData": { "token": "theirs" } }))
            .unwrap();
    env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: thief\nspec:\n  secretName: taken\n",
    );
    assert!(ok, "{err}");
    env.wait_ready_reason("thief", "SecretConflict").await;
    let obj = live("thief");
    let (status, message) = health(&obj);
    assert_eq!((status.as_str(), message.as_str()), ("Degraded", ready_message(&obj).as_str()));
    assert!(message.contains("taken"), "{message}");

    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: odd\nspec:\n  tokenExpiresIn: 1d\n  renewBefore: 23h\n",
    );
    assert!(ok, "{err}");
    env.wait_ready_reason("odd", "InvalidSpec").await;
    assert_eq!(health(&live("odd")).0, "Degraded");

    // A repair within the minimum interval (1m) of the last issue waits: the Secret deleted right after
    // the first token was issued. Degraded: the Secret holds no token meanwhile.
    let (ok, _, err) = env
        .apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: fragile\nspec: {}\n");
    assert!(ok, "{err}");
    env.wait_ready_reason("fragile", "TokenIssued").await;
    env.secrets().delete("fragile-scim-token", &Default::default()).await.unwrap();
    env.wait_ready_reason("fragile", "IssueDeferred").await;
    let obj = live("fragile");
    assert_eq!(health(&obj), ("Degraded".into(), ready_message(&obj)));

    // The API server refuses the Secret write (an immutable Secret) for a requested rotation: Degraded,
    // although the request is still pending.
    let (ok, _, err) =
        env.apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: frozen\nspec: {}\n");
    assert!(ok, "{err}");
    env.wait_ready_reason("frozen", "TokenIssued").await;
    env.token("frozen-scim-token").await.unwrap();
    env.secrets()
        .patch("frozen-scim-token", &PatchParams::default(), &Patch::Merge(json!({ "immutable": true })))
        .await
        .unwrap();
    let requested = run_rotate("frozen").await;
    env.wait_ready_reason("frozen", "SecretWriteFailed").await;
    let obj = live("frozen");
    assert_eq!(annotation(&obj, ROTATE_ANNOTATION), Some(requested.as_str()));
    assert_eq!(health(&obj), ("Degraded".into(), ready_message(&obj)));
    env.assert_log_clean().await;
}
