//! `cargo xtask cluster up|down`: a real single-node cluster on this machine, like kind without a
//! Docker engine.
//!
//! `up` starts, in the background, a supervisor (`cargo xtask cluster serve`, hidden) that owns every
//! process through the envtest crate (its certificates, its etcd + kube-apiserver +
//! kube-controller-manager, its process supervision: every child dies with the supervisor), adds
//! kube-scheduler, Debian's containerd (config, root and state under the run directory, the default
//! socket path, which the kubelet probes for stats), the kubelet (a client certificate for
//! `system:node:scim-node` made here, no bootstrap) and kube-proxy (iptables mode), waits until the
//! node is Ready and prints the kubeconfig. `down` stops the supervisor, which drains the node and
//! undoes everything; then `down` sweeps whatever a crashed supervisor left (container processes, shims,
//! mounts, interfaces, iptables rules, sysctls, cgroups) and compares the machine with the snapshot
//! `up` took before it changed anything: any difference fails it.
//!
//! Every packet stays on this machine: pods get addresses from 198.18.0.0/24 on the bridge `scim0`
//! (198.18.0.1, which is also the node's and the API server's address), Services from 198.19.0.0/24
//! (both from 198.18.0.0/15, the range reserved for benchmark networks); pods have no default route,
//! the Service range is routed to the bridge, and a `SCIM-NODE` chain in `FORWARD` drops anything
//! from the range that would leave through another interface.

mod host;
mod pause;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use envtest::ControlPlane;

use crate::step;

/// The node's name (and its kubelet's user, `system:node:<name>`).
pub(crate) const NODE_NAME: &str = "scim-node";
/// The bridge the pods' veths join; it also carries the node's and the API server's address.
pub(crate) const BRIDGE: &str = "scim0";
pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub(crate) const POD_CIDR: &str = "198.18.0.0/24";
pub(crate) const SERVICE_CIDR: &str = "198.19.0.0/24";
pub(crate) const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Both of the above: what must never leave the machine.
pub(crate) const RANGE: &str = "198.18.0.0/15";
/// The kubelet probes this path for container stats whatever its runtime endpoint says.
pub(crate) const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub(crate) const DEFAULT_RUN_DIR: &str = "/run/scim-token-operator/cluster";
/// How long `up` waits for the node to be Ready (a cold page cache on two busy cores).
const UP_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
#[command(
    about = "A real single-node cluster on this machine (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, containerd), like kind without Docker",
    long_about = "A real single-node cluster on this machine, like kind without a Docker engine: etcd, \
kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (iptables mode) v1.36.3 \
from hack/envtest-assets.sh --node, Debian's containerd and runc, the bridge CNI with host-local IPAM, a \
pause image built here (gcc -static). Pods get 198.18.0.0/24, Services 198.19.0.0/24; nothing is routed \
off the machine. Needs root and `apt-get install containerd runc containernetworking-plugins iptables gcc`. \
One cluster per machine (the containerd socket, the bridge and the kubelet's port are the machine's)."
)]
pub(crate) struct Options {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start the cluster in the background and print its kubeconfig's path
    Up {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// An image archive (OCI or Docker, e.g. from `cargo xtask image`) to import into containerd's
        /// k8s.io namespace before the node is reported up (repeatable)
        #[arg(long = "import", value_name = "ARCHIVE")]
        imports: Vec<PathBuf>,
    },
    /// Stop everything `up` started and check that the machine is as `up` found it
    Down {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// The supervisor `up` starts in the background (not for direct use)
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        run_dir: PathBuf,
        #[arg(long = "import")]
        imports: Vec<PathBuf>,
    },
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    match o.action {
        Action::Up { run_dir, imports } => up(&run_dir, &imports),
        Action::Down { run_dir } => down(&run_dir),
        Action::Serve { run_dir, imports } => serve(&run_dir, &imports).await,
    }
}

/// Files of the run directory.
pub(crate) struct RunDir(PathBuf);

impl RunDir {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn kubeconfig(&self) -> PathBuf {
        self.path("kubeconfig")
    }
    fn ready(&self) -> PathBuf {
        self.path("ready")
    }
    fn supervisor_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.path("supervisor.pid")).ok()?.trim().parse().ok()?;
        // Only a live `cluster serve` counts (a pid may be reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (cmdline.contains(" cluster serve ") && cmdline.contains(&*self.0.to_string_lossy())).then_some(pid)
    }
}

/// Root, the tools, and a free socket path.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    ensure!(euid == 0, "cargo xtask cluster needs root (containerd, the kubelet, iptables, mounts)");
    let mut missing = Vec::new();
    for (tool, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("iptables-save", "iptables"),
        ("ip", "iproute2"),
        ("gcc", "gcc"),
    ] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (package {package})"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new(host::CNI_BIN_DIR).join(plugin).is_file() {
            missing.push(format!("{}/{plugin} (package containernetworking-plugins)", host::CNI_BIN_DIR));
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing: {}\ninstall them with: apt-get install containerd runc containernetworking-plugins iptables iproute2 gcc libc6-dev",
            missing.join(", ")
        );
    }
    Ok(())
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `hack/envtest-assets.sh --node`: the directory holding kube-scheduler, kubelet and kube-proxy.
pub(crate) fn node_binaries() -> anyhow::Result<PathBuf> {
    let script = envtest::workspace_root().join("hack/envtest-assets.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--node")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(out.status.success(), "{} --node failed", script.display());
    let dir = PathBuf::from(String::from_utf8(out.stdout)?.lines().last().unwrap_or_default().trim());
    ensure!(dir.join("kubelet").is_file(), "{} --node printed {}, without a kubelet", script.display(), dir.display());
    Ok(dir)
}

pub(crate) fn up(run_dir: &Path, imports: &[PathBuf]) -> anyhow::Result<()> {
    let started = Instant::now();
    preflight()?;
    let dir = RunDir(run_dir.to_path_buf());
    if let Some(pid) = dir.supervisor_pid() {
        bail!(
            "a cluster is already up (supervisor pid {pid}, kubeconfig {}); run `cargo xtask cluster down` first",
            dir.kubeconfig().display()
        );
    }
    if run_dir.exists() {
        step(&format!("cleaning up what a previous run left in {}", run_dir.display()));
        for line in host::sweep(&dir)? {
            println!("  {line}");
        }
        std::fs::remove_dir_all(run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    }
    ensure!(
        std::os::unix::net::UnixStream::connect(CONTAINERD_SOCKET).is_err(),
        "something already serves {CONTAINERD_SOCKET} (a containerd of the system?): stop it first, the kubelet reads \
         container stats from that path"
    );
    step("the node's binaries (hack/envtest-assets.sh --node; built from Go modules once)");
    let bins = node_binaries()?;
    step("the pause image (a static binary from C, gcc -static; built once)");
    let pause = pause::archive()?;
    let imports = imports
        .iter()
        .map(|p| std::fs::canonicalize(p).with_context(|| format!("image archive {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(run_dir)?;
    std::fs::write(dir.path("bins"), bins.to_string_lossy().as_bytes())?;
    std::fs::write(dir.path("pause-archive"), pause.to_string_lossy().as_bytes())?;
    host::Snapshot::take()?.save(&dir.path("before.json"))?;

    step(&format!("starting the cluster (supervisor log: {})", dir.path("supervisor.log").display()));
    let log = std::fs::File::create(dir.path("supervisor.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["cluster", "serve", "--run-dir"]).arg(run_dir);
    for image in &imports {
        cmd.arg("--import").arg(image);
    }
    // A session of its own: the supervisor outlives this command and the terminal.
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = cmd.spawn().context("starting the supervisor")?;
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if dir.ready().exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the cluster did not start ({status}); last lines of {}:\n{}\n(`cargo xtask cluster down` cleans up)",
                dir.path("supervisor.log").display(),
                tail(&dir.path("supervisor.log"), 40)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the node was not Ready within {UP_TIMEOUT:?}; see {} (`cargo xtask cluster down` cleans up)",
                dir.path("supervisor.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{}", std::fs::read_to_string(dir.ready())?.trim_end());
    println!(
        "cluster up in {:.1} s\nkubeconfig: {kc}\n  export KUBECONFIG={kc}\n  {kubectl} get nodes -o wide\nstop it with: cargo xtask cluster down",
        started.elapsed().as_secs_f64(),
        kc = dir.kubeconfig().display(),
        kubectl = bins.join("kubectl").display(),
    );
    Ok(())
}

pub(crate) fn down(run_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    preflight()?;
    let dir = RunDir(run_dir.to_path_buf());
    if !run_dir.exists() {
        println!("no cluster in {} (nothing to do)", run_dir.display());
        return Ok(());
    }
    if let Some(pid) = dir.supervisor_pid() {
        step(&format!("stopping the supervisor (pid {pid}): drain the node, stop every component"));
        // SAFETY: plain kill(2) of a process verified above to be our supervisor.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM)
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while dir.supervisor_pid().is_some() {
            if Instant::now() > deadline {
                println!("  the supervisor did not stop within 120 s: SIGKILL (its children die with it)");
                // SAFETY: as above.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid, libc::SIGKILL)
                };
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    step("sweeping what is left (container processes, shims, mounts, interfaces, iptables rules, sysctls, cgroups)");
    let swept = host::sweep(&dir)?;
    for line in &swept {
        println!("  {line}");
    }
    step("comparing the machine with the snapshot `up` took");
    let leftovers = match host::Snapshot::load(&dir.path("before.json")) {
        Ok(before) => before.leftovers(&host::Snapshot::take()?, run_dir),
        Err(e) => vec![format!("no snapshot to compare with ({e:#})")],
    };
    if leftovers.is_empty() {
        println!("  no leftover process, mount, interface, iptables rule, sysctl or cgroup");
        std::fs::remove_dir_all(run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
        println!("cluster down in {:.1} s", started.elapsed().as_secs_f64());
        Ok(())
    } else {
        bail!("left over after down (the run directory {} is kept):\n- {}", run_dir.display(), leftovers.join("\n- "))
    }
}

/// The supervisor: host network, control plane, containerd, node components; then waits for SIGTERM
/// and takes it all down again.
async fn serve(run_dir: &Path, imports: &[PathBuf]) -> anyhow::Result<()> {
    let dir = RunDir(run_dir.to_path_buf());
    std::fs::write(dir.path("supervisor.pid"), std::process::id().to_string())?;
    let bins = PathBuf::from(std::fs::read_to_string(dir.path("bins"))?);
    let pause = PathBuf::from(std::fs::read_to_string(dir.path("pause-archive"))?);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let result = async {
        host::setup(&dir).context("setting up the host network")?;
        let cp = start(&dir, &bins, &pause, imports).await;
        let cp = match cp {
            Ok(cp) => cp,
            Err(e) => return Err(e),
        };
        let stopping = Instant::now();
        let waited = cp
            .wait_until("a signal to stop", Duration::from_secs(100 * 365 * 86_400), || {
                let signalled = futures::FutureExt::now_or_never(sigterm.recv()).is_some()
                    || futures::FutureExt::now_or_never(sigint.recv()).is_some();
                async move { Ok(signalled) }
            })
            .await;
        if let Err(e) = &waited {
            log(&format!("a component exited: {e:#}"));
        }
        log("stopping");
        drain(&cp, &dir, &bins).await;
        drop(cp);
        log(&format!("components stopped in {:.1} s", stopping.elapsed().as_secs_f64()));
        waited
    }
    .await;
    if let Err(e) = &result {
        log(&format!("error: {e:#}"));
    }
    match host::sweep(&dir) {
        Ok(lines) => lines.iter().for_each(|l| log(l)),
        Err(e) => log(&format!("sweep: {e:#}")),
    }
    let _ = std::fs::remove_file(dir.path("supervisor.pid"));
    result
}

fn log(line: &str) {
    println!("cluster serve: {line}");
    let _ = std::io::stdout().flush();
}

async fn start(dir: &RunDir, bins: &Path, pause: &Path, imports: &[PathBuf]) -> anyhow::Result<ControlPlane> {
    let t = Instant::now();
    let cp = ControlPlane::start_with(envtest::Options {
        cluster: Some(envtest::Cluster {
            address: NODE_IP,
            service_cidr: SERVICE_CIDR.into(),
            kubernetes_service_ip: KUBERNETES_SERVICE_IP,
        }),
        ..envtest::Options::default()
    })
    .await
    .context("starting etcd, kube-apiserver and kube-controller-manager")?;
    std::fs::copy(cp.kubeconfig_path(), dir.kubeconfig())?;
    // How `down` finds etcd, kube-apiserver and kube-controller-manager if this supervisor crashed and
    // they outlived it (they should not: they die with it).
    std::fs::write(dir.path("control-plane-dir"), cp.tmp_dir().to_string_lossy().as_bytes())?;
    log(&format!("control plane up at {} in {:.1} s", cp.server_url(), t.elapsed().as_secs_f64()));

    let t = Instant::now();
    host::write_containerd_config(dir)?;
    let mut containerd = Command::new("containerd");
    containerd.arg("--config").arg(dir.path("containerd/config.toml"));
    cp.spawn("containerd", containerd, &dir.path("containerd.log"))?;
    cp.wait_until("containerd", Duration::from_secs(60), || async {
        Ok(ctr(&["version"]).stdout(Stdio::null()).stderr(Stdio::null()).status()?.success())
    })
    .await?;
    for archive in std::iter::once(pause).chain(imports.iter().map(PathBuf::as_path)) {
        let out = ctr(&["images", "import", "--no-unpack=false"]).arg(archive).output()?;
        ensure!(
            out.status.success(),
            "importing {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        log(&format!("imported {}: {}", archive.display(), String::from_utf8_lossy(&out.stdout).trim()));
    }
    log(&format!("containerd up in {:.1} s", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let [scheduler_port, kubelet_healthz, proxy_healthz, proxy_metrics] = free_ports()?;
    let scheduler_kc = cp.user_kubeconfig("system:kube-scheduler", None)?;
    let mut scheduler = Command::new(bins.join("kube-scheduler"));
    scheduler
        .arg(format!("--kubeconfig={}", scheduler_kc.display()))
        .arg("--leader-elect=false")
        .arg(format!("--secure-port={scheduler_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--tls-cert-file={}", cp.pki_file("apiserver.crt").display()))
        .arg(format!("--tls-private-key-file={}", cp.pki_file("apiserver.key").display()))
        // Found by its working directory if it ever outlived the supervisor.
        .current_dir(&dir.0);
    cp.spawn("kube-scheduler", scheduler, &dir.path("kube-scheduler.log"))?;

    let node_kc = cp.user_kubeconfig(&format!("system:node:{NODE_NAME}"), Some("system:nodes"))?;
    std::fs::write(dir.path("kubelet.yaml"), host::kubelet_config(dir, &cp, kubelet_healthz))?;
    let mut kubelet = Command::new(bins.join("kubelet"));
    kubelet
        .arg(format!("--config={}", dir.path("kubelet.yaml").display()))
        .arg(format!("--kubeconfig={}", node_kc.display()))
        .arg(format!("--root-dir={}", dir.path("kubelet").display()))
        .arg(format!("--cert-dir={}", dir.path("kubelet/pki").display()))
        .arg(format!("--hostname-override={NODE_NAME}"))
        .arg(format!("--node-ip={NODE_IP}"))
        // No CAP_SYS_RESOURCE here: a negative oom_score_adj cannot be set.
        .arg("--oom-score-adj=0")
        .arg("--v=2");
    cp.spawn("kubelet", kubelet, &dir.path("kubelet.log"))?;

    let proxy_kc = cp.user_kubeconfig("system:kube-proxy", None)?;
    std::fs::write(dir.path("kube-proxy.yaml"), host::kube_proxy_config(&proxy_kc, proxy_healthz, proxy_metrics))?;
    let mut proxy = Command::new(bins.join("kube-proxy"));
    proxy.arg(format!("--config={}", dir.path("kube-proxy.yaml").display()));
    cp.spawn("kube-proxy", proxy, &dir.path("kube-proxy.log"))?;

    let kubectl = |args: &[&str]| -> anyhow::Result<String> {
        let out = cp.kubectl().args(args).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    cp.wait_until("the node to be Ready", UP_TIMEOUT, || {
        let ready =
            kubectl(&["get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]);
        async move { Ok(ready?.trim() == "True") }
    })
    .await?;
    cp.wait_until("the default ServiceAccount", Duration::from_secs(60), || {
        let sa = kubectl(&["get", "serviceaccount", "default", "-o", "name"]);
        async move { Ok(sa?.trim() == "serviceaccount/default") }
    })
    .await?;
    log(&format!("node Ready in {:.1} s", t.elapsed().as_secs_f64()));
    let nodes = kubectl(&["get", "nodes", "-o", "wide"])?;
    std::fs::write(dir.ready(), nodes)?;
    Ok(cp)
}

/// Stop the node in an order that lets each part clean up after itself: no new pods (scheduler,
/// controllers), every pod deleted through the kubelet (its sandbox stopped: CNI DEL releases the
/// address and removes the veth), then the kubelet, kube-proxy (and its `--cleanup`), the
/// remaining containers through containerd, and containerd.
async fn drain(cp: &ControlPlane, dir: &RunDir, bins: &Path) {
    cp.stop("kube-scheduler");
    cp.stop("kube-controller-manager");
    let deleted = cp
        .kubectl()
        .args(["delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force", "--wait=false"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if deleted.is_ok_and(|s| s.success()) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !host::running_tasks().is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cp.stop("kubelet");
    cp.stop("kube-proxy");
    let cleanup = Command::new(bins.join("kube-proxy")).arg("--cleanup").output();
    if let Ok(out) = cleanup
        && !out.status.success()
    {
        log(&format!("kube-proxy --cleanup: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    host::remove_containers();
    cp.stop("containerd");
    let _ = dir;
}

/// `ctr` on the node's containerd, in the CRI namespace.
pub(crate) fn ctr(args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"]).args(args);
    cmd
}

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
