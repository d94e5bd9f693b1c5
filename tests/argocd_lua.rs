//! Runs the Argo CD resource customizations in `argocd/resource_customizations/` (health check,
//! action discovery, the `rotate` action) through their own Argo CD-format test files
//! (`health_test.yaml`, `actions/action_test.yaml`), on Lua 5.1 (the language of gopher-lua, Argo CD's
//! interpreter), in the environment Argo CD gives a customization from `argocd-cm` (util/lua/lua.go):
//!
//! - the base, table and package libraries only: no `string`, `math`, `io`, `os`, no string methods
//!   (`useOpenLibs` is off unless an admin turns it on);
//! - `require("os")` yields Argo CD's restricted os module, `date` and `time` only, with gopher-lua's
//!   `strftime` (only the flags it knows);
//! - the object is the global `obj`, decoded like Argo CD's `decodeValue`: numbers become Lua numbers,
//!   JSON null becomes nil (and is dropped from arrays, as gopher-lua's `Append` does), empty objects
//!   and arrays become empty tables;
//! - results are encoded like gopher-json (an empty table is `[]`, mixed or sparse keys are errors) and
//!   an action's object is cleaned like Argo CD's `cleanReturnedObj` (an empty table where the input had
//!   an object goes back to `{}`), then turned into the JSON merge patch Argo CD sends to the API server.
//!
//! It also checks that `argocd/argocd-cm-patch.yaml` embeds exactly these scripts, and runs the health
//! check and the rotate action on live directories that the operator reconciles on the real control
//! plane (the status shapes it really writes, the merge patch Argo CD's server would send).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use mlua::{Lua, LuaOptions, StdLib, Table, Value};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const GROUP_KIND: &str = "scim.tokenops.dev/ScimDirectory";
const ROTATE_ANNOTATION: &str = "scim.tokenops.dev/rotate";
/// The clock the action tests run with; the expected outputs contain this instant.
const FIXED_NOW: &str = "2026-06-01T12:00:00Z";
/// Argo CD runs every script under a one-second context timeout.
const ARGO_TIMEOUT: Duration = Duration::from_secs(1);
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

// ---------------------------------------------------------------------------------------------
// The sandbox: what Argo CD's runLua sets up.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Clock {
    Fixed(i64),
    Real,
}

impl Clock {
    fn fixed() -> Clock {
        Clock::Fixed(FIXED_NOW.parse::<Timestamp>().unwrap().as_second())
    }

    fn now(self) -> i64 {
        match self {
            Clock::Fixed(s) => s,
            Clock::Real => Timestamp::now().as_second(),
        }
    }
}

/// gopher-lua's `strftime` (Argo CD's copy in util/lua/oslib_safe.go) for the flags a script here may
/// use; any other flag fails the test rather than be formatted differently from Argo CD.
fn strftime(second: i64, format: &str) -> Result<String, String> {
    let t = Timestamp::from_second(second).map_err(|e| e.to_string())?.to_zoned(TimeZone::UTC);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('Y') => out.push_str(&format!("{:04}", t.year())),
            Some('m') => out.push_str(&format!("{:02}", t.month())),
            Some('d') => out.push_str(&format!("{:02}", t.day())),
            Some('H') => out.push_str(&format!("{:02}", t.hour())),
            Some('M') => out.push_str(&format!("{:02}", t.minute())),
            Some('S') => out.push_str(&format!("{:02}", t.second())),
            Some('F') => out.push_str(&format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day())),
            Some('X') => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())),
            other => return Err(format!("os.date flag %{} is not mimicked by this harness", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// A fresh Lua state per run, as Argo CD creates one per evaluation, with `obj` set.
fn sandbox(obj: &Json, clock: Clock) -> Lua {
    // The base library is always there; Argo CD opens package (for require), base and table.
    let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::default()).unwrap();
    let os = lua.create_table().unwrap();
    os.set(
        "date",
        lua.create_function(move |_, (format, time): (Option<String>, Value)| {
            if !time.is_nil() {
                // gopher-lua reads an explicit time in local time even after "!": keep scripts off it.
                return Err(mlua::Error::runtime("os.date with an explicit time is not supported in Argo CD"));
            }
            let format = format.unwrap_or_else(|| "%c".to_owned());
            let Some(format) = format.strip_prefix('!') else {
                return Err(mlua::Error::runtime(
                    "os.date without '!' formats the Argo CD server's local time: use UTC ('!')",
                ));
            };
            if format.starts_with("*t") {
                return Err(mlua::Error::runtime("os.date('*t') is not mimicked by this harness"));
            }
            strftime(clock.now(), format).map_err(mlua::Error::runtime)
        })
        .unwrap(),
    )
    .unwrap();
    os.set(
        "time",
        lua.create_function(move |_, arg: Value| {
            if !arg.is_nil() {
                return Err(mlua::Error::runtime("os.time(table) is not mimicked by this harness"));
            }
            Ok(clock.now() as f64)
        })
        .unwrap(),
    )
    .unwrap();
    let loader = lua.create_function(move |_, ()| Ok(os.clone())).unwrap();
    let package: Table = lua.globals().get("package").unwrap();
    let preload: Table = package.get("preload").unwrap();
    preload.set("os", loader).unwrap();
    lua.globals().set("obj", to_lua(&lua, obj)).unwrap();
    lua
}

/// Argo CD's `decodeValue`.
fn to_lua(lua: &Lua, value: &Json) -> Value {
    match value {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        // gopher-lua has one number type, float64.
        Json::Number(n) => Value::Number(n.as_f64().expect("a finite number")),
        Json::String(s) => Value::String(lua.create_string(s).unwrap()),
        Json::Array(items) => {
            let table = lua.create_table().unwrap();
            // LTable.Append ignores nil: nulls are dropped and the array stays dense.
            for item in items.iter().filter(|i| !i.is_null()) {
                table.raw_push(to_lua(lua, item)).unwrap();
            }
            Value::Table(table)
        }
        Json::Object(map) => {
            let table = lua.create_table().unwrap();
            for (k, v) in map {
                table.raw_set(k.as_str(), to_lua(lua, v)).unwrap();
            }
            Value::Table(table)
        }
    }
}

/// gopher-json's `Encode`.
fn to_json(value: &Value) -> Result<Json, String> {
    Ok(match value {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => json!(*i),
        Value::Number(n) => number(*n)?,
        Value::String(s) => Json::String(s.to_str().map_err(|e| e.to_string())?.to_owned()),
        Value::Table(t) => {
            let mut ints = BTreeMap::new();
            let mut strings = Map::new();
            for pair in t.pairs::<Value, Value>() {
                let (k, v) = pair.map_err(|e| e.to_string())?;
                match k {
                    Value::String(s) => {
                        strings.insert(s.to_str().map_err(|e| e.to_string())?.to_owned(), to_json(&v)?);
                    }
                    Value::Integer(i) => {
                        ints.insert(i, to_json(&v)?);
                    }
                    Value::Number(n) if n.fract() == 0.0 => {
                        ints.insert(n as i64, to_json(&v)?);
                    }
                    other => return Err(format!("cannot encode a table key of type {}", other.type_name())),
                }
            }
            match (ints.is_empty(), strings.is_empty()) {
                // An empty table is an array: Lua cannot tell.
                (true, true) => Json::Array(vec![]),
                (false, true) => {
                    if ints.keys().copied().ne(1..=ints.len() as i64) {
                        return Err("cannot encode a sparse array".into());
                    }
                    Json::Array(ints.into_values().collect())
                }
                (true, false) => Json::Object(strings),
                (false, false) => return Err("cannot encode a table with both array and object keys".into()),
            }
        }
        other => return Err(format!("cannot encode a value of type {}", other.type_name())),
    })
}

fn number(n: f64) -> Result<Json, String> {
    if !n.is_finite() {
        return Err(format!("cannot encode {n}"));
    }
    // Go's encoding/json writes an integral float64 without a fraction.
    Ok(if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 { json!(n as i64) } else { json!(n) })
}

/// Runs a script with `obj` and returns what it returned, as JSON.
fn run(script_name: &str, script: &str, obj: &Json, clock: Clock) -> Json {
    let lua = sandbox(obj, clock);
    let started = Instant::now();
    let result: Value = lua
        .load(script)
        .set_name(script_name)
        .call(())
        .unwrap_or_else(|e| panic!("{script_name} failed on Lua 5.1 in Argo CD's sandbox: {e}"));
    assert!(started.elapsed() < ARGO_TIMEOUT, "{script_name} took {:?}, beyond Argo CD's timeout", started.elapsed());
    assert!(matches!(result, Value::Table(_)), "{script_name} must return a table, returned {}", result.type_name());
    to_json(&result).unwrap_or_else(|e| panic!("{script_name}: Argo CD could not encode the result: {e}"))
}

/// Argo CD's `cleanReturnedObj`: an empty table returned where the input had an object is the object.
fn clean_returned(new: &mut Map<String, Json>, old: &Map<String, Json>) {
    for (key, old_value) in old {
        let Some(new_value) = new.get_mut(key) else { continue };
        // Argo CD puts back the whole old value, so a script cannot empty an object either.
        if old_value.is_object() && new_value.as_array().is_some_and(Vec::is_empty) {
            *new_value = old_value.clone();
            continue;
        }
        match (new_value, old_value) {
            (Json::Object(n), Json::Object(o)) => clean_returned(n, o),
            (Json::Array(n), Json::Array(o)) => clean_returned_array(n, o),
            _ => {}
        }
    }
}

fn clean_returned_array(new: &mut [Json], old: &[Json]) {
    for (n, o) in new.iter_mut().zip(old) {
        match (n, o) {
            (Json::Object(n), Json::Object(o)) => clean_returned(n, o),
            (Json::Array(n), Json::Array(o)) => clean_returned_array(n, o),
            _ => {}
        }
    }
}

/// RFC 7386 merge patch from `from` to `to`, what Argo CD's server sends for an action's result.
fn merge_patch(from: &Json, to: &Json) -> Option<Json> {
    match (from, to) {
        (Json::Object(f), Json::Object(t)) => {
            let mut patch = Map::new();
            for (k, fv) in f {
                match t.get(k) {
                    None => {
                        patch.insert(k.clone(), Json::Null);
                    }
                    Some(tv) => {
                        if let Some(p) = merge_patch(fv, tv) {
                            patch.insert(k.clone(), p);
                        }
                    }
                }
            }
            for (k, tv) in t {
                if !f.contains_key(k) {
                    patch.insert(k.clone(), tv.clone());
                }
            }
            (!patch.is_empty()).then_some(Json::Object(patch))
        }
        _ => (from != to).then(|| to.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// Argo CD's test file formats.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthTests {
    tests: Vec<HealthTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HealthTest {
    health_status: HealthStatus,
    input_path: String,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct HealthStatus {
    status: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ActionTests {
    discovery_tests: Vec<DiscoveryTest>,
    action_tests: Vec<ActionTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DiscoveryTest {
    input_path: String,
    result: Vec<ResourceAction>,
}

/// Argo CD's `ResourceAction` (params left out: no action here has any).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ResourceAction {
    name: String,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    icon_class: String,
    #[serde(default)]
    display_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ActionTest {
    action: String,
    input_path: String,
    expected_output_path: String,
}

fn health_tests() -> Vec<HealthTest> {
    let path = customization_dir().join("health_test.yaml");
    let tests: HealthTests =
        serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    tests.tests
}

fn action_tests() -> ActionTests {
    let path = customization_dir().join("actions/action_test.yaml");
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Argo CD's `ExecuteHealthLua`: the returned table as a HealthStatus, unknown codes made Unknown.
fn evaluate_health(script: &str, obj: &Json) -> HealthStatus {
    let result = run("health.lua", script, obj, Clock::Real);
    let status = result.get("status").and_then(Json::as_str).unwrap_or_default().to_owned();
    let message = result.get("message").and_then(Json::as_str).unwrap_or_default().to_owned();
    if !["Unknown", "Progressing", "Suspended", "Healthy", "Degraded", "Missing"].contains(&status.as_str()) {
        return HealthStatus { status: "Unknown".into(), message: "Lua returned an invalid health status".into() };
    }
    HealthStatus { status, message }
}

/// Argo CD's `ExecuteResourceActionDiscovery`.
fn discover(script: &str, obj: &Json) -> BTreeSet<ResourceAction> {
    let result = run("discovery.lua", script, obj, Clock::Real);
    let map = match result {
        Json::Array(a) if a.is_empty() => return BTreeSet::new(),
        Json::Object(map) => map,
        other => panic!("discovery.lua returned {other}, not a table of actions"),
    };
    map.into_iter()
        .map(|(name, value)| match value {
            // An empty table: an enabled action without options.
            Json::Array(a) if a.is_empty() => {
                ResourceAction { name, disabled: false, icon_class: String::new(), display_name: String::new() }
            }
            Json::Object(mut fields) => {
                fields.insert("name".into(), Json::String(name.clone()));
                serde_json::from_value(Json::Object(fields))
                    .unwrap_or_else(|e| panic!("discovery.lua: action {name} does not decode: {e}"))
            }
            other => panic!("discovery.lua: action {name} is {other}, not a table"),
        })
        .collect()
}

/// Argo CD's `ExecuteResourceAction` for an action returning the modified object.
fn execute_action(name: &str, obj: &Json, clock: Clock) -> Json {
    let script = read(&customization_dir().join("actions").join(name).join("action.lua"));
    let result = run(&format!("actions/{name}/action.lua"), &script, obj, clock);
    let Json::Object(mut new) = result else {
        panic!("action {name} must return the modified object (an impacted-resource list is not expected here)")
    };
    clean_returned(&mut new, obj.as_object().expect("an object"));
    Json::Object(new)
}

fn annotation<'a>(obj: &'a Json, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/annotations").and_then(|a| a.get(key)).and_then(Json::as_str)
}

/// Paths of the YAML files under `dir/testdata`, relative to `dir`.
fn testdata_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("testdata"))
        .unwrap()
        .map(|e| format!("testdata/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".yaml"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn sandbox_is_argo_cds() {
    let probe = r#"
        local os = require("os")
        local r = {}
        r.string = type(string); r.math = type(math); r.io = type(io); r.globalOs = type(_G.os)
        r.debug = type(debug); r.table = type(table); r.tostring = type(tostring); r.ipairs = type(ipairs)
        r.stringMethods = pcall(function() return ("x"):upper() end)
        local names = {}
        for k, _ in pairs(os) do table.insert(names, k) end
        table.sort(names)
        r.os = table.concat(names, ",")
        r.obj = obj.metadata.name
        r.emptyObject = type(obj.spec.empty)
        r.dense = #obj.spec.list
        r.null = obj.spec.null == nil
        r.number = obj.metadata.generation + 0.5
        return r
    "#;
    let obj = json!({"metadata": {"name": "acme", "generation": 2},
                     "spec": {"empty": {}, "list": ["a", null, "b"], "null": null}});
    let r = run("probe", probe, &obj, Clock::fixed());
    assert_eq!(
        r,
        json!({"string": "nil", "math": "nil", "io": "nil", "globalOs": "nil", "debug": "nil",
               "table": "table", "tostring": "function", "ipairs": "function", "stringMethods": false,
               "os": "date,time", "obj": "acme", "emptyObject": "table", "dense": 2, "null": true,
               "number": 2.5})
    );
    // The restricted os module: UTC formatting with gopher-lua's flags, and the fixed clock.
    let date = r#"local os = require("os"); return { os.date("!%Y-%m-%dT%H:%M:%SZ"), os.date("!%FT%XZ"), os.time() }"#;
    let expected_second = FIXED_NOW.parse::<Timestamp>().unwrap().as_second();
    assert_eq!(run("date", date, &json!({}), Clock::fixed()), json!([FIXED_NOW, FIXED_NOW, expected_second]));
    // Encoding follows gopher-json: empty tables are arrays, mixed tables do not encode.
    assert_eq!(run("empty", "return { a = {} }", &json!({}), Clock::fixed()), json!({"a": []}));
    let lua = sandbox(&json!({}), Clock::fixed());
    let mixed: Value = lua.load("return { 1, a = 2 }").call(()).unwrap();
    assert!(to_json(&mixed).is_err());
}

#[test]
fn health_checks_match_health_test_yaml() {
    let dir = customization_dir();
    let script = read(&dir.join("health.lua"));
    let tests = health_tests();
    let mut failures = Vec::new();
    for test in &tests {
        let obj = read_yaml(&dir.join(&test.input_path));
        let got = evaluate_health(&script, &obj);
        if got != test.health_status {
            failures.push(format!("{}: expected {:?}, got {:?}", test.input_path, test.health_status, got));
        }
    }
    assert!(failures.is_empty(), "health.lua:\n{}", failures.join("\n"));
}

#[test]
fn health_tests_cover_every_status_reason_and_input() {
    let dir = customization_dir();
    let tests = health_tests();
    let statuses: BTreeSet<&str> = tests.iter().map(|t| t.health_status.status.as_str()).collect();
    for status in ["Healthy", "Progressing", "Degraded"] {
        assert!(statuses.contains(status), "no health test expects {status}");
    }
    // Every Ready reason the operator writes appears in some input.
    let reasons: BTreeSet<String> = tests
        .iter()
        .filter_map(|t| read_yaml(&dir.join(&t.input_path)).pointer("/status/conditions/0/reason").cloned())
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    for reason in ["TokenIssued", "TokenRotated", "TokenExpired", "SecretConflict", "InvalidSpec"] {
        assert!(reasons.contains(reason), "no health test input has Ready reason {reason}");
    }
    // Every input is used, and used once.
    let used: Vec<&str> = tests.iter().map(|t| t.input_path.as_str()).collect();
    let unique: BTreeSet<String> = used.iter().map(|s| s.to_string()).collect();
    assert_eq!(unique.len(), used.len(), "an input is listed twice in health_test.yaml");
    assert_eq!(unique, testdata_files(&dir), "testdata/ and health_test.yaml disagree");
}

#[test]
fn discovery_matches_action_test_yaml() {
    let dir = customization_dir().join("actions");
    let script = read(&dir.join("discovery.lua"));
    let tests = action_tests();
    assert!(!tests.discovery_tests.is_empty(), "no discovery tests");
    for test in &tests.discovery_tests {
        let obj = read_yaml(&dir.join(&test.input_path));
        let expected: BTreeSet<ResourceAction> = test.result.iter().cloned().collect();
        assert_eq!(discover(&script, &obj), expected, "discovery on {}", test.input_path);
    }
    // Every discovered action has a script, and every script is discoverable.
    let scripts: BTreeSet<String> = action_dirs(&dir);
    for test in &tests.discovery_tests {
        let names: BTreeSet<String> = test.result.iter().map(|a| a.name.clone()).collect();
        assert_eq!(names, scripts, "actions/*/action.lua and the discovered actions differ");
    }
}

fn action_dirs(actions: &Path) -> BTreeSet<String> {
    std::fs::read_dir(actions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("action.lua").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn actions_match_action_test_yaml_and_touch_only_the_rotate_annotation() {
    let dir = customization_dir().join("actions");
    let tests = action_tests();
    let tested: BTreeSet<String> = tests.action_tests.iter().map(|t| t.action.clone()).collect();
    assert_eq!(tested, action_dirs(&dir), "every action needs an action test");
    for test in &tests.action_tests {
        let input = read_yaml(&dir.join(&test.input_path));
        let expected = read_yaml(&dir.join(&test.expected_output_path));
        let output = execute_action(&test.action, &input, Clock::fixed());
        assert_eq!(
            output, expected,
            "action {} on {}: output differs from {}",
            test.action, test.input_path, test.expected_output_path
        );

        // What Argo CD's server sends: a merge patch that sets the annotation and nothing else, so no
        // field that Git manages (spec, labels, other annotations) can drift.
        let value = annotation(&output, ROTATE_ANNOTATION).expect("the rotate annotation is set").to_owned();
        assert_eq!(
            merge_patch(&input, &output),
            Some(json!({"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})),
            "action {} on {} changes more than the annotation",
            test.action,
            test.input_path
        );
        assert_eq!(output["spec"], input["spec"]);

        // A new request: different from the current annotation and from the last handled one.
        assert_ne!(Some(value.as_str()), annotation(&input, ROTATE_ANNOTATION));
        assert_ne!(Some(value.as_str()), input.pointer("/status/lastRotationRequest").and_then(Json::as_str));
        assert!(value.starts_with(FIXED_NOW), "{value} is not the fixed clock's time");
    }
    // Inputs and outputs are all used.
    let used: BTreeSet<String> = tests
        .action_tests
        .iter()
        .flat_map(|t| [t.input_path.clone(), t.expected_output_path.clone()])
        .chain(tests.discovery_tests.iter().map(|t| t.input_path.clone()))
        .collect();
    assert_eq!(used, testdata_files(&dir), "actions/testdata/ and action_test.yaml disagree");
}

#[test]
fn rotate_writes_a_fresh_rfc3339_timestamp_on_the_real_clock() {
    let dir = customization_dir().join("actions");
    for test in action_tests().action_tests.iter().filter(|t| t.action == "rotate") {
        let input = read_yaml(&dir.join(&test.input_path));
        let before = Timestamp::now().as_second();
        let output = execute_action("rotate", &input, Clock::Real);
        let after = Timestamp::now().as_second();
        let value = annotation(&output, ROTATE_ANNOTATION).unwrap();
        let at: Timestamp = value.parse().unwrap_or_else(|e| panic!("{value} is not RFC 3339: {e}"));
        assert!(value.ends_with('Z'), "{value} is not UTC");
        assert!((before..=after).contains(&at.as_second()), "{value} is not the current time");
        assert_ne!(Some(value), annotation(&input, ROTATE_ANNOTATION));
        assert_eq!(
            merge_patch(&input, &output),
            Some(json!({"metadata": {"annotations": {ROTATE_ANNOTATION: value}}}))
        );
    }
}

#[test]
fn rotate_then_health_is_progressing_until_the_operator_handles_the_request() {
    // The two scripts agree: a rotation requested through the action shows as Progressing, and as
    // Healthy once the operator has recorded the value in status.lastRotationRequest.
    let base = customization_dir();
    let health = read(&base.join("health.lua"));
    let input = read_yaml(&base.join("testdata/healthy_issued.yaml"));
    let mut output = execute_action("rotate", &input, Clock::fixed());
    assert_eq!(evaluate_health(&health, &output).status, "Progressing");
    output["status"]["lastRotationRequest"] = json!(annotation(&output, ROTATE_ANNOTATION).unwrap());
    assert_eq!(evaluate_health(&health, &output).status, "Healthy");
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
         # `SCIM_ARGOCD_CM_WRITE=1 cargo test --test argocd_lua`; that test fails when this file is stale.\n\
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

    // Read as Argo CD reads it, independently of how the file was written.
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

    assert!(
        actual == expected,
        "{PATCH_FILE} is stale: run `{WRITE_ENV}=1 cargo test --test argocd_lua` to regenerate it"
    );
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

    let health = read(&customization_dir().join("health.lua"));
    let env = Env::new("argocd").await;
    let live = |name: &'static str| {
        let dirs = env.dirs();
        async move { serde_json::to_value(dirs.get(name).await.unwrap()).unwrap() }
    };
    let mut op = env.operator(&[]);

    let (ok, _, err) = env.apply(include_str!("../examples/basic.yaml"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    assert_eq!(evaluate_health(&health, &live("acme").await).status, "Healthy");

    // With the operator stopped, a spec change and a rotation request stay pending: Progressing.
    assert!(op.terminate().await.success());
    env.dirs()
        .patch("acme", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
        .await
        .unwrap();
    let pending = evaluate_health(&health, &live("acme").await);
    assert_eq!(pending.status, "Progressing");
    assert!(pending.message.contains("generation 2"), "{}", pending.message);
    // The rotate action, sent as Argo CD's server sends it: a merge patch of the returned object.
    let before = live("acme").await;
    let after = execute_action("rotate", &before, Clock::Real);
    let patch = merge_patch(&before, &after).expect("the action changes something");
    env.dirs().patch("acme", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let requested = annotation(&after, ROTATE_ANNOTATION).unwrap().to_string();
    assert_eq!(evaluate_health(&health, &live("acme").await).status, "Progressing");

    // The operator handles both with one rotation; the application turns Healthy.
    let _op = env.operator(&[]);
    wait_for("the rotation request handled", Duration::from_secs(60), || async {
        let d = env.dirs().get("acme").await.unwrap();
        (d.status?.last_rotation_request.as_deref() == Some(requested.as_str())).then_some(())
    })
    .await;
    let healthy = evaluate_health(&health, &live("acme").await);
    assert_eq!(healthy.status, "Healthy", "{}", healthy.message);

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
    let conflict = evaluate_health(&health, &live("thief").await);
    assert_eq!(conflict.status, "Degraded");
    assert!(conflict.message.contains("taken"), "{}", conflict.message);

    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: odd\nspec:\n  tokenExpiresIn: 1d\n  renewBefore: 23h\n",
    );
    assert!(ok, "{err}");
    env.wait_ready_reason("odd", "InvalidSpec").await;
    assert_eq!(evaluate_health(&health, &live("odd").await).status, "Degraded");
    env.assert_log_clean().await;
}
