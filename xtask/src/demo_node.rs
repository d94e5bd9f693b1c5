//! `cargo xtask demo --node`: the demo as the operator runs in a user's cluster. The image of `cargo
//! xtask image` is imported into a real node (`cargo xtask cluster up`), the chart is installed with
//! Helm as the README says (only the pull policy set: the image is on the node, not in a registry),
//! the example directory gets its token, and a request with it reaches the verifier's pods through their
//! ClusterIP Service; then a rotation, and the old token refused. Kept running until Ctrl-C, then
//! `cargo xtask cluster down`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::{cluster, kubectl_output, run_kubectl, step, whole_loop};

const NAMESPACE: &str = "scim-token-operator";
const RELEASE: &str = "scim-token-operator";
const DEMO_NAMESPACE: &str = "demo";

pub(crate) async fn run(once: bool, image: Option<PathBuf>) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let archive = match image {
        Some(archive) => archive,
        None => {
            step("cargo xtask image (the release binary on its distroless base)");
            let status = Command::new(std::env::current_exe()?).arg("image").status()?;
            ensure!(status.success(), "cargo xtask image failed");
            let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
            target.join("image/scim-token-operator.tar")
        }
    };
    let reference = archive_reference(&archive)?;
    let run_dir = PathBuf::from(cluster::DEFAULT_RUN_DIR);
    step(&format!("cargo xtask cluster up --import {}", archive.display()));
    cluster::up(&run_dir, std::slice::from_ref(&archive))?;
    let kubeconfig = run_dir.join("kubeconfig");
    let kubectl_bin = cluster::node_binaries()?.join("kubectl");
    let kubectl = || {
        let mut cmd = Command::new(&kubectl_bin);
        cmd.env("KUBECONFIG", &kubeconfig);
        cmd
    };
    let shown = show(&root, &kubectl, &kubeconfig, &reference).await;
    if once || shown.is_err() {
        let down = cluster::down(&run_dir);
        shown?;
        down?;
        step("done (--once)");
        return Ok(());
    }
    let verify = shown?;
    println!(
        "\nTry it:\n  export KUBECONFIG={kc}\n  kubectl get pods -n {NAMESPACE} -o wide\n  kubectl get scimdir -n {DEMO_NAMESPACE}\n  TOKEN=$(kubectl get secret acme-scim-token -n {DEMO_NAMESPACE} -o jsonpath='{{.data.token}}' | base64 -d)\n  curl -i -H \"Authorization: Bearer $TOKEN\" http://{verify}/verify/scim/v2/Users   # the verifier's ClusterIP Service, as a proxy asks it\n  kubectl patch scimdir acme -n {DEMO_NAMESPACE} --type merge -p '{{\"spec\":{{\"rotationGeneration\":1}}}}'   # rotate declaratively\n  kubectl logs -n {NAMESPACE} deployment/{RELEASE}   # the operator's log (JSON, never a token)\n\nkubectl: {kubectl}\nPress Ctrl-C to stop; the node is then taken down (cargo xtask cluster down).",
        kc = kubeconfig.display(),
        kubectl = kubectl_bin.display(),
    );
    tokio::signal::ctrl_c().await?;
    cluster::down(&run_dir)
}

/// The install, the example's token and the loop through the verifier's Service; returns the Service's
/// address.
async fn show(
    root: &Path,
    kubectl: &dyn Fn() -> Command,
    kubeconfig: &Path,
    reference: &str,
) -> anyhow::Result<SocketAddr> {
    let (repository, tag) = reference.rsplit_once(':').context("an image reference without a tag")?;
    let helm = String::from_utf8(
        Command::new("bash").arg(root.join("hack/envtest-assets.sh")).arg("--helm").output()?.stdout,
    )?;
    let chart = root.join("charts/scim-token-operator");
    step(&format!(
        "helm install {RELEASE} charts/scim-token-operator -n {NAMESPACE} --create-namespace --set image.repository={repository} --set image.tag={tag} --set image.pullPolicy=Never --wait"
    ));
    let t = Instant::now();
    let status = Command::new(helm.trim())
        .env("KUBECONFIG", kubeconfig)
        .args(["install", RELEASE])
        .arg(&chart)
        .args(["-n", NAMESPACE, "--create-namespace", "--wait", "--timeout", "180s"])
        .args(["--set", &format!("image.repository={repository}"), "--set", &format!("image.tag={tag}")])
        .args(["--set", "image.pullPolicy=Never"])
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "helm install failed");
    println!("  every pod Ready (their own probes) in {:.1} s", t.elapsed().as_secs_f64());
    print!("{}", kubectl_output(kubectl(), &["get", "pods", "-n", NAMESPACE, "-o", "wide"])?);

    let example = root.join("examples/basic.yaml");
    step(&format!(
        "kubectl create namespace {DEMO_NAMESPACE}; kubectl apply -n {DEMO_NAMESPACE} -f examples/basic.yaml"
    ));
    run_kubectl(kubectl(), &["create", "namespace", DEMO_NAMESPACE])?;
    run_kubectl(kubectl(), &["apply", "-n", DEMO_NAMESPACE, "-f", crate::path_str(&example)?])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    while kubectl_output(kubectl(), &["get", "scimdir", "acme", "-n", DEMO_NAMESPACE, "-o", ready])?.trim() != "True" {
        if Instant::now() > deadline {
            bail!("the directory did not become Ready within 60 s (kubectl logs -n {NAMESPACE} deployment/{RELEASE})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    step("the directory is Ready (issued by the operator's pod)");
    print!("{}", kubectl_output(kubectl(), &["get", "scimdir", "-n", DEMO_NAMESPACE])?);
    let secret = kubectl_output(
        kubectl(),
        &["get", "scimdir", "acme", "-n", DEMO_NAMESPACE, "-o", "jsonpath={.status.secretName}"],
    )?;
    println!("Secret: {DEMO_NAMESPACE}/{secret} (key `token`; the plaintext is only in the Secret)");

    let service = format!("{RELEASE}-verifier");
    let ip =
        kubectl_output(kubectl(), &["get", "service", &service, "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"])?;
    let verify = SocketAddr::new(ip.trim().parse().context("the verifier Service's ClusterIP")?, 8081);
    step(&format!("the verifier's pods through their ClusterIP Service {NAMESPACE}/{service} ({verify}, kube-proxy)"));
    whole_loop(kubectl, DEMO_NAMESPACE, &secret, verify).await?;
    Ok(verify)
}

/// The image's name inside a `cargo xtask image` archive (a Docker archive: manifest.json's RepoTags),
/// as containerd names it once imported.
fn archive_reference(archive: &Path) -> anyhow::Result<String> {
    let out = Command::new("tar").arg("-xOf").arg(archive).arg("manifest.json").output()?;
    ensure!(out.status.success(), "{} is not an image archive (no manifest.json)", archive.display());
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tag = manifest[0]["RepoTags"][0].as_str().context("manifest.json without RepoTags")?;
    Ok(if tag.contains('/') { tag.to_owned() } else { format!("docker.io/library/{tag}") })
}
