//! `cargo xtask image`: the operator's container image as an OCI archive, without a Docker engine.
//!
//! The same image the `Dockerfile` describes (the test below and every build check that), made the
//! way distroless makes `gcr.io/distroless/cc-debian12:nonroot`: files unpacked from Debian 12
//! packages (`apt-get download` + `dpkg-deb -x`), a passwd/group with `nonroot` (65532), `/tmp`,
//! `/home/nonroot`, the CA bundle, no shell and no package manager. Only the libraries the release
//! binary loads are kept (its `DT_NEEDED` closure, read with `readelf`), and the result is checked by
//! running the binary with the image's own dynamic loader and libraries.
//!
//! The image itself is assembled by go-containerregistry's `crane` (`hack/go-tool.sh crane`): one
//! layer tar (GNU tar, reproducible: sorted, numeric owners, fixed mtime) appended to an empty OCI
//! base, then `crane mutate` for user, entrypoint, cmd, ports, workdir, env and labels. `crane mutate`
//! reads from a registry only, so the build talks to a `crane registry serve` on 127.0.0.1 that lives
//! as long as the command.
#![allow(unsafe_code)] // libc (geteuid) has no safe wrapper here: each call carries its SAFETY note

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::step;

/// The image `cargo xtask image` builds. The Dockerfile's final stage must say the same (tested).
pub(crate) const SPEC: Spec = Spec {
    user: "65532:65532",
    entrypoint: &["/usr/local/bin/scim-token-operator"],
    cmd: &["run"],
    // 8080: metrics and probes; 8081: the verifier's HTTP external auth; 8082: its gRPC ext_authz.
    ports: &["8080/tcp", "8081/tcp", "8082/tcp"],
    workdir: "/home/nonroot",
    // What distroless sets (static/static.bzl), so a process in either image sees the same.
    env: &[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    ],
    binary: "/usr/local/bin/scim-token-operator",
};

/// The binary in the image: the Dockerfile's builder stage runs the same command (tested).
pub(crate) const CARGO_BUILD: &[&str] =
    &["build", "--release", "--locked", "-p", "scim-token-operator", "--bin", "scim-token-operator"];

/// The Debian release of the packages (and of the Dockerfile's two stages: `-bookworm`, `-debian12`).
const DEBIAN_CODENAME: &str = "bookworm";
const DEBIAN_VERSION: &str = "12";

/// Where the libraries may come from; anything else the binary needs is an error. gcc-12-base carries
/// libgcc-s1's copyright (its doc directory is a symlink there), as in distroless's cc image.
const PACKAGES: &[&str] = &["libc6", "libgcc-s1", "gcc-12-base", "ca-certificates"];

/// The Dockerfile's base images whose config this module knows: (image, user, workdir, env), as
/// distroless builds them (static/static.bzl: nonroot = uid 65532, workdir /home/nonroot).
const KNOWN_BASES: &[(&str, &str, &str, &[&str])] = &[(
    "gcr.io/distroless/cc-debian12:nonroot",
    "65532",
    "/home/nonroot",
    &[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    ],
)];

const DEFAULT_REPOSITORY: &str = "ghcr.io/scim-token-operator/scim-token-operator";

/// The image's runtime config, static form.
pub(crate) struct Spec {
    pub(crate) user: &'static str,
    pub(crate) entrypoint: &'static [&'static str],
    pub(crate) cmd: &'static [&'static str],
    pub(crate) ports: &'static [&'static str],
    pub(crate) workdir: &'static str,
    pub(crate) env: &'static [&'static str],
    pub(crate) binary: &'static str,
}

/// What the Dockerfile and the built image are compared on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) user: String,
    pub(crate) entrypoint: Vec<String>,
    pub(crate) cmd: Vec<String>,
    pub(crate) ports: BTreeSet<String>,
    pub(crate) workdir: String,
    pub(crate) env: BTreeSet<String>,
    /// The operator binary's path in the image (the Dockerfile's COPY destination; the entrypoint's
    /// program in the image, whose layer is checked to hold it).
    pub(crate) binary: String,
}

impl Spec {
    pub(crate) fn config(&self) -> Config {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Config {
            user: self.user.into(),
            entrypoint: owned(self.entrypoint),
            cmd: owned(self.cmd),
            ports: self.ports.iter().map(|s| (*s).to_owned()).collect(),
            workdir: self.workdir.into(),
            env: self.env.iter().map(|s| (*s).to_owned()).collect(),
            binary: self.binary.into(),
        }
    }

    /// `crane mutate` flags that give an empty image this config (plus the platform and labels).
    fn mutate_args(&self, platform: &str, labels: &BTreeMap<&str, String>) -> Vec<String> {
        let mut args: Vec<String> = vec!["--set-platform".into(), platform.into()];
        args.extend(["--user".into(), self.user.into(), "--workdir".into(), self.workdir.into()]);
        // crane splits list flags on commas: one flag per element.
        for e in self.entrypoint {
            args.extend(["--entrypoint".into(), (*e).into()]);
        }
        for c in self.cmd {
            args.extend(["--cmd".into(), (*c).into()]);
        }
        for p in self.ports {
            args.extend(["--exposed-ports".into(), (*p).into()]);
        }
        for e in self.env {
            args.extend(["--env".into(), (*e).into()]);
        }
        for (k, v) in labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        args
    }
}

/// `cargo xtask image`
#[derive(Clone, Debug, clap::Parser)]
#[command(
    about = "Build the operator's container image as an OCI archive without a Docker engine (the Dockerfile's image, made like distroless from Debian 12 packages, assembled with crane)",
    long_about = "Build the operator's container image as an OCI archive without a Docker engine.\n\n\
The release binary (cargo build --release --locked) on a distroless-style base made from Debian 12 \
packages (libc6, libgcc-s1, ca-certificates: apt-get download + dpkg-deb -x, only the libraries the \
binary loads), user 65532, no shell; assembled with crane (hack/go-tool.sh builds it once). The \
result is checked against the Dockerfile's final stage and by running the binary with the image's \
own loader and libraries.\n\n\
Writes target/image/scim-token-operator.tar (a Docker/OCI archive for `ctr -n k8s.io images import`, \
`kind load image-archive` or `docker load`), config.json, manifest.json and digest. Needs a Debian 12 \
host (apt-get, dpkg-deb, readelf, GNU tar) and Go."
)]
pub(crate) struct Options {
    /// The image's name in the archive (what the imported image is called) [default:
    /// ghcr.io/scim-token-operator/scim-token-operator:<the binary's version>, the chart's image]
    #[arg(long, value_name = "REF")]
    pub(crate) tag: Option<String>,
    /// Use this operator binary instead of building one (it must be built as the Dockerfile builds it)
    #[arg(long, value_name = "PATH")]
    pub(crate) binary: Option<PathBuf>,
    /// Where to write the archive and its config [default: target/image]
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// The `org.opencontainers.image.source` label
    #[arg(long, value_name = "URL", default_value = "https://github.com/scim-token-operator/scim-token-operator")]
    pub(crate) source: String,
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = envtest::workspace_root();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let out = o.out.clone().unwrap_or_else(|| target.join("image"));
    std::fs::create_dir_all(&out)?;
    let out = std::fs::canonicalize(&out)?;

    // The Dockerfile first: a build that could not match it is not worth minutes of compiling.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).context("reading the Dockerfile")?;
    let want = dockerfile_config(&dockerfile)?;
    agree(&want, &SPEC.config()).context("the Dockerfile and xtask/src/image.rs (SPEC) disagree")?;
    host_is_debian()?;

    let binary = match &o.binary {
        Some(b) => b.clone(),
        None => {
            step(&format!("cargo {}", CARGO_BUILD.join(" ")));
            let t = Instant::now();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo).args(CARGO_BUILD).current_dir(&root).status()?;
            ensure!(status.success(), "building the release binary failed");
            println!("  release build: {:.1} s", t.elapsed().as_secs_f64());
            target.join("release/scim-token-operator")
        }
    };
    ensure!(binary.is_file(), "{} does not exist", binary.display());

    step("crane (hack/go-tool.sh crane; built from its Go module once)");
    let crane = PathBuf::from(output(Command::new("bash").arg(root.join("hack/go-tool.sh")).arg("crane"))?.trim());

    step(&format!("Debian packages: {}", PACKAGES.join(" ")));
    // One package cache whatever --out is.
    let debs = target.join("image/debs");
    let packages = fetch_packages(&debs)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();

    step("the root filesystem (only what the binary loads)");
    let rootfs = out.join("rootfs");
    let unpacked = out.join("unpacked");
    let libs = assemble_rootfs(&binary, &packages, &unpacked, &rootfs)?;
    println!("  libraries: {}", libs.join(", "));
    let version = prove_runs(&rootfs)?;
    println!("  the binary runs on the image's own loader and libraries: {version}");

    step("the layer (GNU tar: sorted, numeric owners, fixed mtime)");
    let epoch = output(Command::new("git").args(["log", "-1", "--format=%ct"]).current_dir(&root))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".into());
    let layer = out.join("layer.tar");
    make_layer(&rootfs, &layer, &epoch)?;

    step("the image (crane append onto an empty OCI base, crane mutate)");
    let registry = Registry::start(&crane)?;
    let staged = format!("{}/scim-token-operator:layer", registry.address);
    let revision = output(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(&root))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let op_version = version.split_whitespace().last().unwrap_or_default().to_owned();
    let tag = o.tag.clone().unwrap_or_else(|| format!("{DEFAULT_REPOSITORY}:{op_version}"));
    let labels = BTreeMap::from([
        ("org.opencontainers.image.source", o.source.clone()),
        ("org.opencontainers.image.version", op_version.clone()),
        ("org.opencontainers.image.revision", revision),
        ("org.opencontainers.image.title", "scim-token-operator".to_owned()),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
    ]);
    let archive = out.join("scim-token-operator.tar");
    run_quiet(Command::new(&crane).args(["append", "--oci-empty-base", "-f"]).arg(&layer).args(["-t", &staged]))?;
    run_quiet(
        Command::new(&crane)
            .args(["mutate", &staged])
            .args(SPEC.mutate_args(&format!("linux/{arch}"), &labels))
            .args(["-t", &tag, "-o"])
            .arg(&archive),
    )?;
    // Read back what the archive holds: pushed to the local registry as it is.
    let check = format!("{}/scim-token-operator:check", registry.address);
    run_quiet(Command::new(&crane).arg("push").arg(&archive).arg(&check))?;
    run_quiet(Command::new(&crane).args(["validate", "--remote", &check]))?;
    let config_json = output(Command::new(&crane).args(["config", &check]))?;
    let manifest_json = output(Command::new(&crane).args(["manifest", &check]))?;
    let digest = output(Command::new(&crane).args(["digest", &check]))?.trim().to_owned();
    let files = output(
        Command::new("bash")
            .args(["-o", "pipefail", "-c"])
            .arg(format!("'{}' export '{check}' - | tar -tv --numeric-owner", crane.display())),
    )?;
    drop(registry);
    std::fs::write(out.join("config.json"), &config_json)?;
    std::fs::write(out.join("manifest.json"), &manifest_json)?;
    std::fs::write(out.join("digest"), format!("{digest}\n"))?;

    step("the image agrees with the Dockerfile");
    let config: serde_json::Value = serde_json::from_str(&config_json)?;
    agree(&want, &image_config(&config)?).context("the built image and the Dockerfile disagree")?;
    check_files(&files, SPEC.binary)?;

    let manifest: serde_json::Value = serde_json::from_str(&manifest_json)?;
    let layer_size = manifest["layers"][0]["size"].as_u64().context("no layer size in the manifest")?;
    let archive_size = std::fs::metadata(&archive)?.len();
    let rootfs_size = std::fs::metadata(&layer)?.len();
    println!(
        "  {}\n  {digest}\n  layer: {} compressed ({} uncompressed, {} entries); archive: {}\n  built in {:.1} s",
        archive.display(),
        mib(layer_size),
        mib(rootfs_size),
        files.lines().count(),
        mib(archive_size),
        started.elapsed().as_secs_f64()
    );
    println!(
        "Load it: ctr -n k8s.io images import {p} | kind load image-archive {p} | docker load -i {p}",
        p = archive.strip_prefix(&root).unwrap_or(&archive).display()
    );
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The packages' versions come from this machine's apt: it must be the Debian the Dockerfile builds on.
fn host_is_debian() -> anyhow::Result<()> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    ensure!(
        field("ID") == "debian" && field("VERSION_CODENAME") == DEBIAN_CODENAME,
        "cargo xtask image builds the Dockerfile's Debian 12 ({DEBIAN_CODENAME}) image from this machine's apt and \
         links the binary against its glibc: it needs a Debian 12 host (this is {:?} {:?}); build with Docker instead",
        field("ID"),
        field("VERSION_CODENAME")
    );
    Ok(())
}

struct Package {
    name: String,
    version: String,
    deb: PathBuf,
}

/// `apt-get download` of the candidate versions, kept in `dir` (nothing is downloaded again while
/// the candidates stay the same). As root, missing or stale package lists are refreshed once
/// (`apt-get update`, as hack/test-peers.sh does); otherwise that is left to the user.
fn fetch_packages(dir: &Path) -> anyhow::Result<Vec<Package>> {
    std::fs::create_dir_all(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let packages = match download(dir, root) {
        Ok(p) => p,
        Err(e) if root => {
            step(&format!("apt-get update ({e:#})"));
            run_quiet(Command::new("apt-get").args(["-q", "update"]))?;
            download(dir, root)?
        }
        Err(e) => return Err(e.context("if the package lists are missing or stale, run `sudo apt-get update` once")),
    };
    // The image's glibc must not be older than the one the binary was linked against here.
    let host = output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "libc6"]))?;
    let image = &packages.iter().find(|p| p.name == "libc6").expect("libc6 is in PACKAGES").version;
    let newer_or_same = Command::new("dpkg").args(["--compare-versions", image, "ge", host.trim()]).status()?.success();
    ensure!(
        newer_or_same,
        "apt's libc6 {image} is older than this machine's {host}: the binary may need symbols it lacks"
    );
    for p in &packages {
        println!("  {} {}", p.name, p.version);
    }
    Ok(packages)
}

fn download(dir: &Path, root: bool) -> anyhow::Result<Vec<Package>> {
    // As root, apt downloads as its _apt user, which may not enter this directory: download as root
    // (the package is still verified against the signed archive index).
    let apt_opts: &[&str] = if root { &["-o", "APT::Sandbox::User=root"] } else { &[] };
    let mut packages = Vec::new();
    for name in PACKAGES {
        let show = output(Command::new("apt-cache").args(["show", "--no-all-versions", name]))
            .with_context(|| format!("apt knows no {name}"))?;
        let field = |k: &str| show.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).map(str::to_owned);
        let version = field("Version").with_context(|| format!("apt knows no version of {name}"))?;
        let arch = field("Architecture").with_context(|| format!("apt knows no architecture of {name}"))?;
        // apt-get download's file name: the epoch's colon is written %3a.
        let deb = dir.join(format!("{name}_{}_{arch}.deb", version.replace(':', "%3a")));
        if !deb.is_file() {
            run_quiet(
                Command::new("apt-get")
                    .arg("download")
                    .args(apt_opts)
                    .arg(format!("{name}={version}"))
                    .current_dir(dir),
            )?;
            ensure!(deb.is_file(), "apt-get download {name}={version} wrote no {}", deb.display());
        }
        packages.push(Package { name: (*name).to_owned(), version, deb });
    }
    Ok(packages)
}

/// `readelf --dynamic`: the `DT_NEEDED` entries.
pub(crate) fn needed(readelf_dynamic: &str) -> Vec<String> {
    readelf_dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            l.split_once("Shared library: [").and_then(|(_, r)| r.split_once(']')).map(|(n, _)| n.to_owned())
        })
        .collect()
}

/// `readelf --program-headers`: the program interpreter (the dynamic loader's path).
pub(crate) fn interpreter(readelf_headers: &str) -> Option<String> {
    readelf_headers
        .lines()
        .find_map(|l| l.split_once("[Requesting program interpreter: "))
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(p, _)| p.to_owned())
}

/// Unpacks the packages, then copies into `rootfs` the binary, the transitive `DT_NEEDED` closure
/// of it (from the packages only), the loader, the CA bundle, copyrights, dpkg status entries,
/// passwd/group/nsswitch/os-release, /tmp and the home directories. Returns the libraries' names.
fn assemble_rootfs(binary: &Path, packages: &[Package], unpacked: &Path, rootfs: &Path) -> anyhow::Result<Vec<String>> {
    for d in [unpacked, rootfs] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    std::fs::create_dir_all(unpacked)?;
    for p in packages {
        run_quiet(Command::new("dpkg-deb").arg("-x").arg(&p.deb).arg(unpacked.join(&p.name)))?;
    }
    let multiarch = multiarch()?;
    let lib_dirs = [format!("lib/{multiarch}"), format!("usr/lib/{multiarch}")];

    // Copies a file; `mode` None keeps the package's mode.
    let install = |from: &Path, to_rel: &str, mode: Option<u32>| -> anyhow::Result<()> {
        let to = rootfs.join(to_rel.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("a path in the rootfs"))?;
        std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        if let Some(mode) = mode {
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    install(binary, SPEC.binary, Some(0o755))?;

    // The loader: its path as the binary asks for it (a symlink in libc6, as on Debian).
    let headers = output(Command::new("readelf").args(["--program-headers", "--wide"]).arg(binary))?;
    let interp = interpreter(&headers).context("the binary has no program interpreter (is it static?)")?;
    let mut libs = Vec::new();
    let mut todo = needed(&output(Command::new("readelf").args(["--dynamic", "--wide"]).arg(binary))?);
    let interp_name = Path::new(&interp).file_name().and_then(|n| n.to_str()).context("interpreter name")?.to_owned();
    todo.push(interp_name.clone());
    let mut seen = BTreeSet::new();
    while let Some(lib) = todo.pop() {
        if !seen.insert(lib.clone()) {
            continue;
        }
        let found = packages
            .iter()
            .flat_map(|p| {
                let lib = &lib;
                lib_dirs.iter().map(move |d| (p, format!("{d}/{lib}")))
            })
            .find(|(p, rel)| unpacked.join(&p.name).join(rel).is_file());
        let Some((p, rel)) = found else {
            bail!("the binary needs {lib}, which none of {PACKAGES:?} ships: add its package (and say why)");
        };
        let from = unpacked.join(&p.name).join(&rel);
        install(&from, &rel, None)?;
        libs.push(format!("{lib} ({})", p.name));
        todo.extend(needed(&output(Command::new("readelf").args(["--dynamic", "--wide"]).arg(&from))?));
    }
    let interp_rel = interp.trim_start_matches('/');
    if !rootfs.join(interp_rel).exists() {
        let link = packages
            .iter()
            .map(|p| unpacked.join(&p.name).join(interp_rel))
            .find(|l| l.is_symlink())
            .with_context(|| format!("no package ships the interpreter {interp}"))?;
        let to = rootfs.join(interp_rel);
        std::fs::create_dir_all(to.parent().expect("interpreter dir"))?;
        symlink(std::fs::read_link(&link)?, &to)?;
    }

    // The CA bundle, as distroless (rules_distroless `cacerts`) and update-ca-certificates make it:
    // every certificate of the package, in name order, concatenated.
    let ca = unpacked.join("ca-certificates/usr/share/ca-certificates");
    let mut certs: Vec<PathBuf> =
        walk(&ca)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "crt")).collect();
    certs.sort();
    ensure!(certs.len() > 50, "ca-certificates holds only {} certificates", certs.len());
    let mut bundle = String::new();
    for c in &certs {
        let pem = std::fs::read_to_string(c)?;
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    write(rootfs, "etc/ssl/certs/ca-certificates.crt", &bundle, 0o644)?;

    // Copyrights and the dpkg status entries scanners read (distroless's /var/lib/dpkg/status.d).
    for p in packages {
        let copyright = unpacked.join(&p.name).join("usr/share/doc").join(&p.name).join("copyright");
        let doc = format!("usr/share/doc/{}", p.name);
        let packaged_doc = unpacked.join(&p.name).join(&doc);
        if packaged_doc.is_symlink() {
            std::fs::create_dir_all(rootfs.join("usr/share/doc"))?;
            symlink(std::fs::read_link(&packaged_doc)?, rootfs.join(&doc))?;
        } else if copyright.is_file() {
            install(&copyright, &format!("{doc}/copyright"), Some(0o644))?;
        }
        let control = output(Command::new("dpkg-deb").arg("-f").arg(&p.deb))?;
        write(
            rootfs,
            &format!("var/lib/dpkg/status.d/{}", p.name),
            &format!("{}\nStatus: install ok installed\n", control.trim_end()),
            0o644,
        )?;
    }

    // distroless's common/ and static/ files (passwd, group, home, tmp, nsswitch.conf, os-release).
    write(
        rootfs,
        "etc/passwd",
        "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        0o644,
    )?;
    write(rootfs, "etc/group", "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n", 0o644)?;
    write(
        rootfs,
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
        0o644,
    )?;
    write(
        rootfs,
        "etc/os-release",
        &format!(
            "PRETTY_NAME=\"Distroless-style (scim-token-operator)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"{DEBIAN_VERSION}\"\nVERSION=\"Debian GNU/Linux {DEBIAN_VERSION} ({DEBIAN_CODENAME})\"\nVERSION_CODENAME={DEBIAN_CODENAME}\n"
        ),
        0o644,
    )?;
    for (dir, mode) in [("tmp", 0o1777), ("root", 0o700), ("home", 0o755), ("home/nonroot", 0o700)] {
        let d = rootfs.join(dir);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
    }
    // Every directory the packages' files created: 0755 whatever the umask was.
    for p in walk(rootfs)? {
        let meta = std::fs::symlink_metadata(&p)?;
        let rel = p.strip_prefix(rootfs)?.to_string_lossy().into_owned();
        if meta.is_dir() && !["tmp", "root", "home", "home/nonroot"].contains(&rel.as_str()) {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    std::fs::set_permissions(rootfs, std::fs::Permissions::from_mode(0o755))?;
    libs.sort();
    Ok(libs)
}

/// The Debian multiarch triplet (`x86_64-linux-gnu`): where libc6 puts its libraries.
fn multiarch() -> anyhow::Result<String> {
    let triplet = output(Command::new("dpkg-architecture").arg("-qDEB_HOST_MULTIARCH"))
        .or_else(|_| output(Command::new("gcc").arg("-print-multiarch")))?;
    Ok(triplet.trim().to_owned())
}

/// Every path under `dir` (directories included), not following symlinks.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if std::fs::symlink_metadata(&p)?.is_dir() {
                stack.push(p.clone());
            }
            all.push(p);
        }
    }
    Ok(all)
}

fn write(rootfs: &Path, rel: &str, content: &str, mode: u32) -> anyhow::Result<()> {
    let to = rootfs.join(rel);
    std::fs::create_dir_all(to.parent().expect("a path in the rootfs"))?;
    std::fs::write(&to, content)?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Runs the image's binary with the image's own loader, restricted to the image's libraries, after
/// checking that the loader resolves every library inside the rootfs. Returns `--version`'s line.
fn prove_runs(rootfs: &Path) -> anyhow::Result<String> {
    let headers = output(
        Command::new("readelf")
            .args(["--program-headers", "--wide"])
            .arg(rootfs.join(SPEC.binary.trim_start_matches('/'))),
    )?;
    let interp = interpreter(&headers).context("no interpreter")?;
    // libc6's /lib64 loader is an absolute symlink: resolved inside the rootfs, never on the host.
    let loader = resolve_in(rootfs, &rootfs.join(interp.trim_start_matches('/')))?;
    let multiarch = multiarch()?;
    let lib_path = format!(
        "{}:{}",
        rootfs.join("lib").join(&multiarch).display(),
        rootfs.join("usr/lib").join(&multiarch).display()
    );
    let bin = rootfs.join(SPEC.binary.trim_start_matches('/'));
    let list =
        output(Command::new(&loader).args(["--inhibit-cache", "--library-path", &lib_path, "--list"]).arg(&bin))?;
    let rootfs_str = rootfs.to_string_lossy();
    for line in list.lines() {
        if let Some((_, to)) = line.split_once("=> ") {
            let path = to.split(" (").next().unwrap_or_default().trim();
            ensure!(
                path.starts_with(rootfs_str.as_ref()),
                "the image's loader resolved a library outside the image: {line}"
            );
        }
    }
    let version = output(
        Command::new(&loader).args(["--inhibit-cache", "--library-path", &lib_path]).arg(&bin).arg("--version"),
    )?;
    Ok(version.trim().to_owned())
}

/// Follows symlinks of `path` (inside `rootfs`) with absolute targets taken relative to `rootfs`.
fn resolve_in(rootfs: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..10 {
        if !p.is_symlink() {
            return Ok(p);
        }
        let target = std::fs::read_link(&p)?;
        p = if target.is_absolute() {
            rootfs.join(target.strip_prefix("/")?)
        } else {
            p.parent().expect("a parent").join(target)
        };
    }
    bail!("too many symlinks at {}", path.display())
}

/// The layer tar: everything root-owned but /home/nonroot (65532:65532, as in distroless).
fn make_layer(rootfs: &Path, layer: &Path, epoch: &str) -> anyhow::Result<()> {
    let common = |c: &mut Command| {
        c.arg("--file")
            .arg(layer)
            .arg("--directory")
            .arg(rootfs)
            .args(["--format=gnu", "--sort=name", "--numeric-owner"])
            .arg(format!("--mtime=@{epoch}"));
    };
    let mut create = Command::new("tar");
    create.arg("--create");
    common(&mut create);
    run_quiet(create.args(["--owner=0", "--group=0", "--exclude=./home/nonroot", "."]))?;
    let mut append = Command::new("tar");
    append.arg("--append");
    common(&mut append);
    run_quiet(append.args(["--owner=65532", "--group=65532", "--no-recursion", "./home/nonroot"]))
}

/// `crane export … | tar -tv`: the binary is a root-owned 0755 file, and there is no shell.
pub(crate) fn check_files(listing: &str, binary: &str) -> anyhow::Result<()> {
    let rel = binary.trim_start_matches('/');
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(5).is_some_and(|p| p.trim_start_matches("./") == rel))
        .with_context(|| format!("the image has no {binary}"))?;
    ensure!(line.starts_with("-rwxr-xr-x 0/0 "), "{binary} is not a root-owned 0755 file: {line}");
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        ensure!(
            !listing.lines().any(|l| l.split_whitespace().nth(5).is_some_and(|p| p.trim_start_matches("./") == shell)),
            "the image has a shell: {shell}"
        );
    }
    Ok(())
}

/// A `crane registry serve` on 127.0.0.1 (in memory), stopped when dropped.
pub(crate) struct Registry {
    child: Child,
    pub(crate) address: String,
}

impl Registry {
    pub(crate) fn start(crane: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(crane)
            .args(["registry", "serve", "--address", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting crane registry serve")?;
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        let port = loop {
            line.clear();
            if stderr.read_line(&mut line)? == 0 {
                let _ = child.kill();
                bail!("crane registry serve exited before serving");
            }
            if let Some(port) = line.trim().rsplit_once("serving on port ").map(|(_, p)| p.to_owned()) {
                break port;
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        Ok(Self { child, address: format!("127.0.0.1:{port}") })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stderr(Stdio::piped()).output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8(out.stdout)?)
}

pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    output(cmd.stdout(Stdio::piped())).map(drop)
}

/// Both sides, field by field; the error names every difference.
pub(crate) fn agree(dockerfile: &Config, image: &Config) -> anyhow::Result<()> {
    let mut diffs = Vec::new();
    macro_rules! cmp {
        ($f:ident) => {
            if dockerfile.$f != image.$f {
                diffs.push(format!("{}: Dockerfile {:?}, image {:?}", stringify!($f), dockerfile.$f, image.$f));
            }
        };
    }
    cmp!(user);
    cmp!(entrypoint);
    cmp!(cmd);
    cmp!(ports);
    cmp!(workdir);
    cmp!(env);
    cmp!(binary);
    ensure!(diffs.is_empty(), "{}", diffs.join("; "));
    Ok(())
}

/// An image config (`crane config`, the OCI/Docker config JSON) as a [`Config`].
pub(crate) fn image_config(json: &serde_json::Value) -> anyhow::Result<Config> {
    let c = &json["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let entrypoint = strings(&c["Entrypoint"]);
    Ok(Config {
        user: c["User"].as_str().unwrap_or_default().to_owned(),
        binary: entrypoint.first().cloned().unwrap_or_default(),
        entrypoint,
        cmd: strings(&c["Cmd"]),
        ports: c["ExposedPorts"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default(),
        workdir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        env: strings(&c["Env"]).into_iter().collect(),
    })
}

/// The Dockerfile's final stage as a [`Config`]: its base's config (from [`KNOWN_BASES`]) with the
/// stage's USER, WORKDIR, ENV, EXPOSE, ENTRYPOINT, CMD applied; `binary` is the one COPY's
/// destination, which must be the entrypoint. Also checks that the builder stage runs
/// [`CARGO_BUILD`] on Debian `bookworm`. Any other instruction in the final stage is an error: the
/// image build would not reproduce it.
pub(crate) fn dockerfile_config(dockerfile: &str) -> anyhow::Result<Config> {
    // Logical lines: comments and blank lines dropped, `\` continuations joined.
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let t = raw.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            lines.push(std::mem::take(&mut current));
        }
    }
    let stages: Vec<usize> =
        lines.iter().enumerate().filter(|(_, l)| l.to_ascii_uppercase().starts_with("FROM ")).map(|(i, _)| i).collect();
    let (&last, earlier) = stages.split_last().context("the Dockerfile has no FROM")?;

    // The builder: the release binary built with the same command, on the same Debian.
    let builder = &lines[earlier.first().copied().unwrap_or(last)..last];
    let cargo = format!("cargo {}", CARGO_BUILD.join(" "));
    ensure!(
        builder.iter().any(|l| l.to_ascii_uppercase().starts_with("RUN ") && l.contains(&cargo)),
        "the Dockerfile's builder stage does not run `{cargo}`"
    );
    ensure!(
        builder.first().is_some_and(|l| l.contains(&format!("-{DEBIAN_CODENAME}"))),
        "the Dockerfile's builder is not Debian {DEBIAN_CODENAME}: {:?}",
        builder.first()
    );

    let from: Vec<&str> = lines[last].split_whitespace().skip(1).filter(|w| !w.starts_with("--")).collect();
    let base = *from.first().context("FROM without an image")?;
    let &(_, user, workdir, env) = KNOWN_BASES
        .iter()
        .find(|(name, ..)| *name == base)
        .with_context(|| format!("the final stage's base {base} is not one whose config xtask/src/image.rs knows"))?;
    ensure!(
        base.contains(&format!("-debian{DEBIAN_VERSION}")),
        "the final stage's base {base} is not Debian {DEBIAN_VERSION}"
    );
    let mut config = Config {
        user: user.into(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        ports: BTreeSet::new(),
        workdir: workdir.into(),
        env: env.iter().map(|s| (*s).to_owned()).collect(),
        binary: String::new(),
    };
    let mut copies = Vec::new();
    for line in &lines[last + 1..] {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match instruction.to_ascii_uppercase().as_str() {
            "USER" => config.user = rest.into(),
            "WORKDIR" => config.workdir = rest.into(),
            "ENV" => {
                let (k, v) = rest.split_once('=').context("ENV must be KEY=value")?;
                config.env.retain(|e| !e.starts_with(&format!("{k}=")));
                config.env.insert(format!("{k}={}", v.trim_matches('"')));
            }
            "EXPOSE" => {
                for p in rest.split_whitespace() {
                    config.ports.insert(if p.contains('/') { p.to_owned() } else { format!("{p}/tcp") });
                }
            }
            "ENTRYPOINT" => {
                config.entrypoint = exec_form(rest).context("ENTRYPOINT must be in exec form")?;
                config.cmd.clear(); // Docker: a new ENTRYPOINT resets the inherited CMD.
            }
            "CMD" => config.cmd = exec_form(rest).context("CMD must be in exec form")?,
            "COPY" => {
                let args: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                ensure!(args.len() == 2, "COPY with one source and a destination expected: {line}");
                let dest = if args[1].ends_with('/') {
                    format!("{}{}", args[1], args[0].rsplit('/').next().unwrap_or_default())
                } else {
                    args[1].to_owned()
                };
                copies.push(dest);
            }
            other => bail!("the final stage has {other}, which `cargo xtask image` does not reproduce: {line}"),
        }
    }
    ensure!(copies.len() == 1, "the final stage should COPY exactly one file (the binary), found {copies:?}");
    config.binary = copies.remove(0);
    ensure!(
        config.entrypoint.first() == Some(&config.binary),
        "the ENTRYPOINT {:?} does not run the copied binary {}",
        config.entrypoint,
        config.binary
    );
    Ok(config)
}

/// `["a", "b"]` → a, b.
fn exec_form(s: &str) -> anyhow::Result<Vec<String>> {
    Ok(serde_json::from_str(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dockerfile() -> String {
        std::fs::read_to_string(envtest::workspace_root().join("Dockerfile")).unwrap()
    }

    /// The Dockerfile and `cargo xtask image` describe the same image: a change on one side alone fails here.
    #[test]
    fn the_dockerfile_describes_the_image_xtask_builds() {
        let from_dockerfile = dockerfile_config(&dockerfile()).unwrap();
        assert_eq!(from_dockerfile, SPEC.config());
        assert_eq!(from_dockerfile.user, "65532:65532");
        assert_eq!(from_dockerfile.entrypoint, ["/usr/local/bin/scim-token-operator"]);
        assert_eq!(from_dockerfile.cmd, ["run"]);
        assert_eq!(from_dockerfile.ports, BTreeSet::from(["8080/tcp".into(), "8081/tcp".into(), "8082/tcp".into()]));
    }

    /// A change to any compared field of the Dockerfile is noticed (the comparison is not vacuous).
    #[test]
    fn a_changed_dockerfile_disagrees() {
        let original = dockerfile();
        for (from, to) in [
            ("USER 65532:65532", "USER 0:0"),
            ("EXPOSE 8080 8081 8082", "EXPOSE 8080 8081"),
            (r#"CMD ["run"]"#, r#"CMD ["verify"]"#),
            (
                "COPY --from=builder /out/scim-token-operator /usr/local/bin/scim-token-operator",
                "COPY --from=builder /out/scim-token-operator /scim-token-operator",
            ),
            (
                "FROM gcr.io/distroless/cc-debian12:nonroot",
                "FROM gcr.io/distroless/cc-debian12:nonroot\nENV RUST_LOG=debug",
            ),
            ("FROM gcr.io/distroless/cc-debian12:nonroot", "FROM gcr.io/distroless/cc-debian12:nonroot\nWORKDIR /"),
        ] {
            assert!(original.contains(from), "the Dockerfile no longer has {from:?}: update this test");
            let changed = original.replace(from, to);
            let verdict = dockerfile_config(&changed).and_then(|c| agree(&c, &SPEC.config()));
            assert!(verdict.is_err(), "{from:?} -> {to:?} went unnoticed");
        }
        for (from, to, why) in [
            (
                "FROM gcr.io/distroless/cc-debian12:nonroot",
                "FROM gcr.io/distroless/static-debian12:nonroot",
                "unknown base",
            ),
            ("USER 65532:65532", "USER 65532:65532\nRUN true", "an instruction the build does not reproduce"),
            ("--bin scim-token-operator", "--bin kubectl-scim", "another binary"),
            ("rust:1.95-bookworm", "rust:1.95-trixie", "another Debian"),
        ] {
            assert!(original.contains(from), "the Dockerfile no longer has {from:?}: update this test");
            assert!(dockerfile_config(&original.replace(from, to)).is_err(), "{why} went unnoticed");
        }
    }

    /// The crane flags carry every field of the spec (a config built from them equals the spec).
    #[test]
    fn the_crane_mutate_flags_carry_the_spec() {
        let args =
            SPEC.mutate_args("linux/amd64", &BTreeMap::from([("org.opencontainers.image.version", "0.1.0".into())]));
        // Apply the flags the way crane mutate does, onto an empty config.
        let mut c = serde_json::json!({"config": {}});
        let mut it = args.iter();
        while let (Some(flag), Some(value)) = (it.next(), it.next()) {
            let cfg = &mut c["config"];
            let push = |cfg: &mut serde_json::Value, key: &str, v: &str| {
                if !cfg[key].is_array() {
                    cfg[key] = serde_json::json!([]);
                }
                cfg[key].as_array_mut().unwrap().push(v.into());
            };
            match flag.as_str() {
                "--user" => cfg["User"] = value.as_str().into(),
                "--workdir" => cfg["WorkingDir"] = value.as_str().into(),
                "--entrypoint" => push(cfg, "Entrypoint", value),
                "--cmd" => push(cfg, "Cmd", value),
                "--env" => push(cfg, "Env", value),
                "--exposed-ports" => cfg["ExposedPorts"][value.as_str()] = serde_json::json!({}),
                "--label" | "--set-platform" => {}
                other => panic!("unexpected flag {other}"),
            }
        }
        assert_eq!(image_config(&c).unwrap(), SPEC.config());
    }

    /// When `cargo xtask image` has run in this checkout, its config agrees with the Dockerfile too.
    #[test]
    fn a_built_image_agrees_with_the_dockerfile() {
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| envtest::workspace_root().join("target"));
        let Ok(json) = std::fs::read_to_string(target.join("image/config.json")) else {
            eprintln!(
                "no target/image/config.json: `cargo xtask image` has not run here; the Dockerfile-vs-spec test covers the rest"
            );
            return;
        };
        let config = image_config(&serde_json::from_str(&json).unwrap()).unwrap();
        agree(&dockerfile_config(&dockerfile()).unwrap(), &config).unwrap();
    }

    #[test]
    fn readelf_output_is_read() {
        let dynamic = " 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]\n 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n 0x000000000000000c (INIT)               0x5000\n";
        assert_eq!(needed(dynamic), ["libgcc_s.so.1", "libc.so.6"]);
        let headers = "  INTERP         0x000318 0x0000000000000318 0x0000000000000318 0x00001c 0x00001c R   0x1\n      [Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]\n";
        assert_eq!(interpreter(headers).as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(interpreter("no interp"), None);
    }

    #[test]
    fn the_layer_listing_is_checked() {
        let ok = "drwxr-xr-x 0/0               0 2026-12-05 20:00 ./usr/local/bin/\n-rwxr-xr-x 0/0        30000000 2026-12-05 20:00 ./usr/local/bin/scim-token-operator\n";
        check_files(ok, SPEC.binary).unwrap();
        assert!(check_files(&ok.replace("-rwxr-xr-x 0/0 ", "-rwxr-xr-x 65532/65532 "), SPEC.binary).is_err());
        assert!(check_files(&ok.replace("scim-token-operator\n", "other\n"), SPEC.binary).is_err());
        let shell = format!("{ok}-rwxr-xr-x 0/0          125000 2026-12-05 20:00 ./bin/sh\n");
        assert!(check_files(&shell, SPEC.binary).is_err());
    }
}
