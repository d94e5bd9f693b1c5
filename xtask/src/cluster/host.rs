//! What `cargo xtask cluster` changes on the host, how it undoes it (`sweep`, idempotent, also after a
//! crash), and the snapshot `down` compares the machine with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use envtest::ControlPlane;

use super::{BRIDGE, CONTAINERD_SOCKET, NODE_IP, NODE_NAME, POD_CIDR, RANGE, RunDir, SERVICE_CIDR, ctr};

/// Where Debian's containernetworking-plugins puts the plugins.
pub(crate) const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The chain in `FORWARD` that keeps the cluster's addresses on the machine.
const GUARD_CHAIN: &str = "SCIM-NODE";
/// The reference of the locally built pause image (containerd's `sandbox_image`).
pub(crate) const PAUSE_IMAGE: &str = "localhost/scim-token-operator/pause:1";
/// Where the kubelet links container logs, whatever its configuration says.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";

/// Kernel settings a node may change: the cluster sets `net.ipv4.ip_forward` (Services between pods
/// on the bridge are routed), and the kubelet (`protectKernelDefaults: false`) and kube-proxy may set
/// others; `sweep` restores each to what the snapshot says and `down` checks them.
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name)
}

/// The bridge with the node's address, the Service range routed to it, forwarding on, the guard chain.
pub(crate) fn setup(dir: &RunDir) -> anyhow::Result<()> {
    std::fs::write(sysctl_path("net/ipv4/ip_forward"), "1").context("setting net.ipv4.ip_forward")?;
    sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    sh("ip", &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE])?;
    sh("ip", &["link", "set", BRIDGE, "up"])?;
    // Services are only reachable through kube-proxy's rules; without this route a packet to one
    // from the host would take the default route off the machine before any rule sees it.
    sh("ip", &["route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", &NODE_IP.to_string()])?;
    sh("iptables", &["-w", "-N", GUARD_CHAIN])?;
    sh("iptables", &["-w", "-A", GUARD_CHAIN, "-s", RANGE, "!", "-o", BRIDGE, "-j", "DROP"])?;
    sh("iptables", &["-w", "-A", GUARD_CHAIN, "-d", RANGE, "!", "-o", BRIDGE, "-j", "DROP"])?;
    sh("iptables", &["-w", "-I", "FORWARD", "1", "-j", GUARD_CHAIN])?;
    for d in ["cni/net.d", "cni/ipam", "containerd", "kubelet", "pod-logs"] {
        std::fs::create_dir_all(dir.path(d))?;
    }
    std::fs::write(dir.path("cni/net.d/10-scim-node.conflist"), cni_config(dir))?;
    Ok(())
}

/// The bridge plugin with host-local IPAM: addresses from [`POD_CIDR`], a route to [`RANGE`] only
/// (no default route: nothing off the machine is reachable), no masquerading.
fn cni_config(dir: &RunDir) -> String {
    let gateway = NODE_IP.to_string();
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "0.4.0",
        "name": NODE_NAME,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "isDefaultGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_CIDR, "rangeStart": "198.18.0.10", "gateway": gateway }]],
                "routes": [{ "dst": RANGE, "gw": gateway }],
                "dataDir": dir.path("cni/ipam"),
            },
        }],
    }))
    .expect("a JSON value serializes")
}

pub(crate) fn write_containerd_config(dir: &RunDir) -> anyhow::Result<()> {
    let p = |name: &str| dir.path(name).display().to_string();
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{CONTAINERD_SOCKET}"
[ttrpc]
  address = "{CONTAINERD_SOCKET}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
"#,
        root = p("containerd/root"),
        state = p("containerd/state"),
        opt = p("containerd/opt"),
        runc = p("runc"),
        cni = p("cni/net.d"),
    );
    std::fs::write(dir.path("containerd/config.toml"), config)?;
    Ok(())
}

pub(crate) fn kubelet_config(dir: &RunDir, cp: &ControlPlane, healthz_port: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{CONTAINERD_SOCKET}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {client_ca}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: ""
failSwapOn: false
podLogsDir: {pod_logs}
serializeImagePulls: false
# The disk is shared with builds: evict only when it is really full, and never collect images.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
        client_ca = cp.pki_file("client-ca.crt").display(),
        pod_logs = dir.path("pod-logs").display(),
    )
}

pub(crate) fn kube_proxy_config(kubeconfig: &Path, healthz_port: u16, metrics_port: u16) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
bindAddress: {NODE_IP}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{healthz_port}
metricsBindAddress: 127.0.0.1:{metrics_port}
# NodePorts only on the node's bridge address; localhostNodePorts would set route_localnet.
nodePortAddresses: ["{NODE_IP}/32"]
oomScoreAdj: 0
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  minSyncPeriod: 1s
  syncPeriod: 30s
# Zero: leave the machine's conntrack table size and timeouts as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display()
    )
}

/// The ids of the tasks containerd runs in the CRI namespace.
pub(crate) fn running_tasks() -> Vec<String> {
    ctr(&["tasks", "ls", "-q"])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Kill and delete every task and container containerd still has (their shims exit with them).
pub(crate) fn remove_containers() {
    let quiet = |args: &[&str]| {
        let _ = ctr(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    for id in running_tasks() {
        quiet(&["tasks", "kill", "-s", "SIGKILL", &id]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in running_tasks() {
        while Instant::now() < deadline {
            let out = ctr(&["tasks", "rm", "-f", &id]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            if out.is_ok_and(|s| s.success()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let containers = ctr(&["containers", "ls", "-q"]).stderr(Stdio::null()).output();
    for id in containers.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines() {
        quiet(&["containers", "rm", id]);
    }
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn kill(pid: i32) {
    // SAFETY: plain kill(2) of a process found to belong to the cluster.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL)
    };
}

/// The kubelet's pod cgroups (cgroup v1: one tree per controller), deepest first.
fn pod_cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let kubepods = controller.path().join("kubepods");
        if kubepods.is_dir() {
            walk(&kubepods, &mut out);
        }
    }
    out
}

/// Processes that belong to the cluster: in a pod cgroup, or working in or pointed at the run
/// directory (containerd, its shims, the node's components) or the supervisor's control-plane
/// directory (etcd, kube-apiserver, kube-controller-manager). Never by binary: the binaries are shared
/// with every test control plane on the machine.
fn cluster_processes(run_dir: &Path, control_plane_dir: Option<&Path>) -> BTreeMap<i32, String> {
    let mut found = BTreeMap::new();
    for cgroup in pod_cgroups() {
        for pid in std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse() {
                found.insert(pid, format!("in {}", cgroup.display()));
            }
        }
    }
    let me = std::process::id() as i32;
    for pid in pids() {
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let in_dir = |dir: &Path| cwd.starts_with(dir) || cmdline.contains(&*dir.to_string_lossy());
        let ours = in_dir(run_dir) || control_plane_dir.is_some_and(in_dir);
        if ours && !cmdline.contains(" cluster down") && !cmdline.contains(" cluster up") {
            found.insert(pid, cmdline.trim().to_owned());
        }
    }
    found
}

fn mounts_under(run_dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(run_dir))
        .collect();
    // Deepest first; a path mounted twice is unmounted twice.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

/// Undo everything (idempotent; nothing needs to be running): returns what it did.
pub(crate) fn sweep(dir: &RunDir) -> anyhow::Result<Vec<String>> {
    let run_dir = &dir.0;
    let bins = std::fs::read_to_string(dir.path("bins")).ok().map(PathBuf::from);
    let control_plane = std::fs::read_to_string(dir.path("control-plane-dir")).ok().map(PathBuf::from);
    let mut done = Vec::new();

    for round in 0..50 {
        let procs = cluster_processes(run_dir, control_plane.as_deref());
        if procs.is_empty() {
            break;
        }
        if round == 0 {
            done.push(format!("killed {} processes: {:?}", procs.len(), procs.values().collect::<Vec<_>>()));
        }
        procs.keys().for_each(|&pid| kill(pid));
        std::thread::sleep(Duration::from_millis(100));
    }

    let mounts = mounts_under(run_dir);
    for m in &mounts {
        let ok = Command::new("umount").arg(m).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(m).stderr(Stdio::null()).status();
        }
    }
    if !mounts.is_empty() {
        done.push(format!("unmounted {} mounts under {}", mounts.len(), run_dir.display()));
    }

    if let Ok(veths) = sh("ip", &["-o", "link", "show", "master", BRIDGE]) {
        for name in veths.lines().filter_map(|l| l.split(':').nth(1)).map(|n| n.trim().split('@').next().unwrap_or(""))
        {
            if !name.is_empty() && sh("ip", &["link", "del", name]).is_ok() {
                done.push(format!("deleted {name}"));
            }
        }
    }
    if sh("ip", &["link", "del", BRIDGE]).is_ok() {
        done.push(format!("deleted the bridge {BRIDGE} (and the route to {SERVICE_CIDR})"));
    }

    if let Some(bins) = &bins
        && iptables_rules().iter().any(|l| l.contains("KUBE-"))
    {
        let _ = Command::new(bins.join("kube-proxy")).arg("--cleanup").output();
        done.push("kube-proxy --cleanup".into());
    }
    if let Ok(before) = Snapshot::load(&dir.path("before.json")) {
        done.extend(remove_kube_chains(&before));
    }
    let mut removed_guard = false;
    while sh("iptables", &["-w", "-D", "FORWARD", "-j", GUARD_CHAIN]).is_ok() {
        removed_guard = true;
    }
    if sh("iptables", &["-w", "-F", GUARD_CHAIN]).is_ok() && sh("iptables", &["-w", "-X", GUARD_CHAIN]).is_ok() {
        removed_guard = true;
    }
    if removed_guard {
        done.push(format!("removed the iptables chain {GUARD_CHAIN}"));
    }

    if let Ok(before) = Snapshot::load(&dir.path("before.json")) {
        for (name, value) in &before.sysctls {
            let now = std::fs::read_to_string(sysctl_path(name)).unwrap_or_default();
            if now.trim() != value.trim() && std::fs::write(sysctl_path(name), value.trim()).is_ok() {
                done.push(format!("{} = {} (was {})", name.replace('/', "."), value.trim(), now.trim()));
            }
        }
    }

    let cgroups = pod_cgroups();
    let removed = cgroups.iter().filter(|c| std::fs::remove_dir(c).is_ok()).count();
    if removed > 0 {
        done.push(format!("removed {removed} pod cgroups"));
    }

    let mut links = 0;
    for e in std::fs::read_dir(CONTAINER_LOG_LINKS).into_iter().flatten().flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(run_dir)) && std::fs::remove_file(e.path()).is_ok()
        {
            links += 1;
        }
    }
    if links > 0 {
        done.push(format!("removed {links} links from {CONTAINER_LOG_LINKS}"));
    }

    if std::os::unix::net::UnixStream::connect(CONTAINERD_SOCKET).is_err() {
        for socket in [CONTAINERD_SOCKET.to_string(), format!("{CONTAINERD_SOCKET}.ttrpc")] {
            if std::fs::remove_file(&socket).is_ok() {
                done.push(format!("removed {socket}"));
            }
        }
    }
    Ok(done)
}

/// The kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`, which
/// `kube-proxy --cleanup` leaves) and any other `KUBE-*` chain the snapshot did not have, with the
/// rules that jump to them; then the nf_tables tables that iptables-nft created for them, if empty.
fn remove_kube_chains(before: &Snapshot) -> Vec<String> {
    let mut done = Vec::new();
    for (family, save, restore) in
        [("4", "iptables-save", "iptables-restore"), ("6", "ip6tables-save", "ip6tables-restore")]
    {
        let Ok(out) = sh(save, &[]) else { continue };
        let mut script = String::new();
        let mut table = "";
        let (mut jumps, mut chains) = (Vec::new(), Vec::new());
        let flush = |table: &str, jumps: &mut Vec<String>, chains: &mut Vec<String>, script: &mut String| {
            if !jumps.is_empty() || !chains.is_empty() {
                script.push_str(&format!("*{table}\n"));
                jumps.drain(..).for_each(|j| script.push_str(&format!("{j}\n")));
                chains.iter().for_each(|c| script.push_str(&format!("-F {c}\n")));
                chains.drain(..).for_each(|c| script.push_str(&format!("-X {c}\n")));
                script.push_str("COMMIT\n");
            }
        };
        for line in out.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            } else if line == "COMMIT" {
                flush(table, &mut jumps, &mut chains, &mut script);
            } else if let Some(chain) = line.strip_prefix(':').and_then(|l| l.split(' ').next()) {
                let known = before.iptables.iter().any(|r| r.starts_with(&format!("ip{family} {table} :{chain} ")));
                if chain.starts_with("KUBE-") && !known {
                    chains.push(chain.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split(' ').next().unwrap_or("");
                let target = rule.split(" -j ").nth(1).and_then(|t| t.split(' ').next()).unwrap_or("");
                if !chain.starts_with("KUBE-") && target.starts_with("KUBE-") {
                    jumps.push(format!("-D {rule}"));
                }
            }
        }
        if script.is_empty() {
            continue;
        }
        let removed = Command::new(restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().expect("piped").write_all(script.as_bytes())?;
                child.wait()
            });
        if removed.is_ok_and(|s| s.success()) {
            done.push(format!("removed the KUBE-* chains left in ip{family}tables"));
        }
    }
    for table in nft_tables().difference(&before.nft_tables) {
        let spec: Vec<&str> = table.split_whitespace().skip(1).collect();
        let empty = sh("nft", &[&["list", "table"][..], &spec].concat()).is_ok_and(|t| {
            t.lines().map(str::trim).all(|l| {
                l.is_empty() || l == "}" || ["table ", "chain ", "type ", "policy "].iter().any(|p| l.starts_with(p))
            })
        });
        if empty && sh("nft", &[&["delete", "table"][..], &spec].concat()).is_ok() {
            done.push(format!("deleted the empty nf_tables {table} that iptables created"));
        }
    }
    done
}

/// `table ip filter`, … (`nft list tables`), when nft is installed.
fn nft_tables() -> BTreeSet<String> {
    sh("nft", &["list", "tables"]).map(|o| o.lines().map(str::to_owned).collect()).unwrap_or_default()
}

fn iptables_rules() -> Vec<String> {
    let mut rules = Vec::new();
    for (family, tool) in [("4", "iptables-save"), ("6", "ip6tables-save")] {
        let Ok(out) = sh(tool, &[]) else { continue };
        let mut table = String::new();
        for line in out.lines() {
            if line.starts_with('#') || line == "COMMIT" {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_owned();
                continue;
            }
            // Counters change by themselves: `:CHAIN POLICY [p:b]` -> `:CHAIN POLICY`.
            let line = match line.rsplit_once(" [") {
                Some((head, _)) if line.starts_with(':') => head,
                _ => line,
            };
            rules.push(format!("ip{family} {table} {line}"));
        }
    }
    rules
}

/// What the machine looked like: compared after `down`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Snapshot {
    iptables: BTreeSet<String>,
    links: BTreeSet<String>,
    mounts: BTreeSet<String>,
    sysctls: BTreeMap<String, String>,
    cgroups: BTreeSet<String>,
    #[serde(default)]
    nft_tables: BTreeSet<String>,
}

impl Snapshot {
    pub(crate) fn take() -> anyhow::Result<Snapshot> {
        let links = sh("ip", &["-o", "link", "show"])?
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .collect();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .collect();
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|s| Some((s.to_string(), std::fs::read_to_string(sysctl_path(s)).ok()?.trim().to_owned())))
            .collect();
        let cgroups = pod_cgroups().iter().map(|c| c.display().to_string()).collect();
        Ok(Snapshot {
            iptables: iptables_rules().into_iter().collect(),
            links,
            mounts,
            sysctls,
            cgroups,
            nft_tables: nft_tables(),
        })
    }

    pub(crate) fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    pub(crate) fn load(path: &Path) -> anyhow::Result<Snapshot> {
        Ok(serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)?)
    }

    /// Everything `after` has that this snapshot had not (and the reverse for rules and sysctls), and
    /// every process of the cluster still running.
    pub(crate) fn leftovers(&self, after: &Snapshot, run_dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for rule in after.iptables.difference(&self.iptables) {
            out.push(format!("iptables rule added: {rule}"));
        }
        for rule in self.iptables.difference(&after.iptables) {
            out.push(format!("iptables rule gone: {rule}"));
        }
        for link in after.links.difference(&self.links) {
            out.push(format!("interface: {link}"));
        }
        for mount in after.mounts.difference(&self.mounts) {
            out.push(format!("mount: {mount}"));
        }
        for (name, value) in &self.sysctls {
            if after.sysctls.get(name) != Some(value) {
                out.push(format!("sysctl {name}: {value} before, {:?} now", after.sysctls.get(name)));
            }
        }
        for table in after.nft_tables.difference(&self.nft_tables) {
            out.push(format!("nf_tables: {table}"));
        }
        for cgroup in after.cgroups.difference(&self.cgroups) {
            out.push(format!("cgroup: {cgroup}"));
        }
        let control_plane = std::fs::read_to_string(run_dir.join("control-plane-dir")).ok().map(PathBuf::from);
        for (pid, what) in cluster_processes(run_dir, control_plane.as_deref()) {
            out.push(format!("process {pid}: {what}"));
        }
        out
    }
}
