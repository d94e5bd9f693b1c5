//! Installing CustomResourceDefinitions and waiting until they are fully served.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use crate::processes::{Processes, wait_until};

/// How long a CRD may take to become Established and discoverable.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);
/// Field manager for the server-side applies done by the harness.
const FIELD_MANAGER: &str = "scim-envtest";

pub(crate) fn read_crds(dir: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            use serde::Deserialize as _;
            let value = serde_json::Value::deserialize(doc)
                .with_context(|| format!("parsing document {} of {}", i + 1, file.display()))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "CustomResourceDefinition" {
                bail!("document {} of {} is a {kind:?}, expected a CustomResourceDefinition", i + 1, file.display());
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value).with_context(|| {
                format!("document {} of {} is not a valid CustomResourceDefinition", i + 1, file.display())
            })?;
            crds.push(crd);
        }
    }
    Ok(crds)
}

/// kube-apiserver delays every `create` (POST) of a custom resource by 2 s while its CRD turned
/// Established less than 2 s ago (`crdHandler.serveResource`, an HA-consistency guard from
/// kubernetes#99199; `lastTransitionTime` has second precision). Sleeping out that window once,
/// right after installing, is cheaper and more predictable than a 2 s stall inside a test.
pub(crate) async fn wait_for_create_delay(established_at: Option<i64>) {
    let Some(established_at) = established_at else {
        return;
    };
    let until = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(established_at).unwrap_or(0))
        + Duration::from_millis(2_100);
    if let Ok(remaining) = until.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(remaining.min(Duration::from_secs(3))).await;
    }
}

/// Apply `crd` and wait until it is served; returns the Unix second at which it became Established.
pub(crate) async fn install_crd(
    client: &kube::Client,
    crd: &CustomResourceDefinition,
    processes: &Processes,
) -> Result<Option<i64>> {
    let name = crd.metadata.name.clone().ok_or_else(|| anyhow!("CustomResourceDefinition without metadata.name"))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = crd.clone();
    crd.metadata.managed_fields = None;
    crd.metadata.resource_version = None;
    crd.status = None;
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .with_context(|| format!("applying CustomResourceDefinition {name}"))?;

    let established = || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await?;
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"))
        }
    };
    wait_until(&format!("CRD {name} to be Established"), CRD_TIMEOUT, processes, established).await?;
    let established_at = api
        .get(&name)
        .await?
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Established")
        .and_then(|c| c.last_transition_time)
        .map(|t| t.0.as_second());

    // Established means the handler serves; also wait until discovery lists every served version,
    // so kubectl (which maps resources through discovery) sees it right away.
    let group = crd.spec.group.clone();
    let plural = crd.spec.names.plural.clone();
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let path = format!("/apis/{group}/{}", version.name);
        let needle = format!("\"name\":\"{plural}\"");
        wait_until(&format!("{path} to list {plural}"), CRD_TIMEOUT, processes, || {
            let client = client.clone();
            let path = path.clone();
            let needle = needle.clone();
            async move {
                let body = client.request_text(http::Request::get(path).body(Vec::new())?).await?;
                Ok(body.contains(&needle))
            }
        })
        .await?;

        // The watch cache of a new resource initializes lazily: until it is ready, lists answer
        // 429 "storage is (re)initializing" and the first write blocks for ~2 s. Wait it out here
        // so callers can list, watch and create right away.
        let list = format!("{path}/{plural}?limit=1");
        wait_until(
            &format!("the storage of {plural}.{group}/{} to initialize", version.name),
            CRD_TIMEOUT,
            processes,
            || {
                let client = client.clone();
                let list = list.clone();
                async move {
                    client.request_text(http::Request::get(list).body(Vec::new())?).await?;
                    Ok(true)
                }
            },
        )
        .await?;
    }
    Ok(established_at)
}
