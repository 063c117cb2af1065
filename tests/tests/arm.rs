//! The ARM builds of the agent (made by `cross/build.sh`, which `tests/run.sh` runs first):
//! each runs under qemu-user against the x86_64 ingest on 127.0.0.1 and delivers what real
//! MQTT clients publish; the packages hold what a gateway needs, and their unit and config
//! pass the tools' own checks.
//!
//! qemu timings are not performance figures; the peak RSS printed is the emulated agent's
//! plus qemu's own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, TENANT, bin, eventually, peak_rss_mib};
use rumqttc::QoS;

fn cross_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cross")
}

/// The ARM binary of `arch`, which must have been built.
fn arm_binary(arch: &str) -> PathBuf {
    let path = cross_dir().join(arch).join("edge-agent");
    assert!(
        path.exists(),
        "{} is missing: run `bash cross/build.sh` (tests/run.sh does)",
        path.display()
    );
    path
}

fn delivers_under_qemu(arch: &str) {
    let binary = arm_binary(arch);
    // cross/build.sh's launcher: qemu-user (+ the target's libc for a glibc build).
    let launcher = cross_dir().join(arch).join("run");
    let file = Command::new("file")
        .arg("-b")
        .arg(&binary)
        .output()
        .expect("file");
    let kind = String::from_utf8_lossy(&file.stdout).to_string();
    let machine = if arch == "aarch64" {
        "ARM aarch64"
    } else {
        "ARM, EABI5"
    };
    assert!(kind.contains(machine), "{arch} binary is {kind}");

    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .launcher(&[launcher])
        .run();
    let (clients, per_client) = (3, 300);
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(LoadSpec {
            mqtt: agent.mqtt,
            clients,
            messages_per_client: per_client,
            rate_per_client: Some(200.0),
            payload_bytes: 200,
            kind: PayloadKind::Json,
            qos: QoS::AtLeastOnce,
            topic: Arc::new(|c, i| format!("plant/{c}/telemetry/t{}", i % 3)),
            client_prefix: format!("{arch}-sensor-"),
        }));
    let total = clients as u64 * per_client;
    assert_eq!(report.acked, total);
    let records = eventually(Duration::from_secs(60), "records in the log", || {
        let r = cloud.read_topic(&format!("iot.{TENANT}.telemetry"));
        (r.len() as u64 >= total).then_some(r)
    });
    assert_eq!(records.len() as u64, total, "each record once");
    let mut payloads: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len() as u64, total, "no duplicates");
    println!(
        "{arch} agent under qemu-user: {total} records delivered at 600 msg/s; peak RSS {:.1} MiB (agent + qemu)",
        peak_rss_mib(agent.process.pid())
    );
}

#[test]
fn the_aarch64_agent_runs_under_qemu_and_delivers() {
    delivers_under_qemu("aarch64");
}

#[test]
fn the_armv7_agent_runs_under_qemu_and_delivers() {
    delivers_under_qemu("armv7");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_packages_hold_binary_config_and_unit_and_both_pass_checks() {
    for (arch, deb_arch) in [("aarch64", "arm64"), ("armv7", "armhf")] {
        arm_binary(arch);
        let deb = std::fs::read_dir(cross_dir())
            .expect("target/cross")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.extension().is_some_and(|x| x == "deb")
                    && p.to_string_lossy().ends_with(&format!("_{deb_arch}.deb"))
            })
            .unwrap_or_else(|| panic!("no {deb_arch} .deb in target/cross"));
        let info = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
        assert!(
            info.contains(&format!("Architecture: {deb_arch}")),
            "{info}"
        );
        // The agent verifies the ingest's certificate against the OS trust store.
        assert!(info.contains("ca-certificates"), "{info}");
        let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
        for path in [
            "./usr/bin/edge-agent",
            "./etc/edge-agent/agent.yaml",
            "./lib/systemd/system/edge-agent.service",
            "./usr/share/doc/edge-agent/INSTALL.md",
            "./usr/share/doc/edge-agent/agent.example.yaml",
        ] {
            assert!(
                listing.contains(path),
                "{deb_arch}.deb lacks {path}:\n{listing}"
            );
        }
        let root = tempfile::tempdir().expect("tempdir");
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(root.path()));
        let control = tempfile::tempdir().expect("tempdir");
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()));
        let conffiles =
            std::fs::read_to_string(control.path().join("conffiles")).expect("conffiles");
        assert!(conffiles.contains("/etc/edge-agent/agent.yaml"));
        let packaged = root.path().join("usr/bin/edge-agent");
        assert_eq!(
            std::fs::read(&packaged).expect("packaged binary"),
            std::fs::read(arm_binary(arch)).expect("built binary"),
            "the package holds the tested binary"
        );

        // The packaged config as is, with its absolute paths moved under the extracted root
        // (the token is provisioned on the gateway; the postinst writes a placeholder).
        let etc = root.path().join("etc/edge-agent");
        std::fs::write(etc.join("token"), "placeholder\n").expect("token");
        std::fs::write(etc.join("users"), "").expect("users");
        let config = std::fs::read_to_string(etc.join("agent.yaml"))
            .expect("packaged config")
            .replace("/etc/edge-agent/", &format!("{}/", etc.display()))
            .replace(
                "/var/lib/edge-agent/",
                &format!("{}/", root.path().display()),
            );
        let checked = root.path().join("checked.yaml");
        std::fs::write(&checked, config).expect("config");
        run(Command::new(bin("edge-agent"))
            .arg("check-config")
            .arg(&checked));

        // The unit, with ExecStart pointing at the extracted binary so the verifier finds it.
        let unit_dir = tempfile::tempdir().expect("tempdir");
        let unit =
            std::fs::read_to_string(root.path().join("lib/systemd/system/edge-agent.service"))
                .expect("unit")
                .replace("/usr/bin/edge-agent", &packaged.display().to_string());
        assert!(unit.contains("Restart=always") && unit.contains("User=edge-agent"));
        for line in [
            "Type=notify",
            "WatchdogSec=60",
            "StartLimitIntervalSec=0",
            "MemoryMax=384M",
            "TasksMax=256",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in the unit");
        }
        assert!(unit.contains("StateDirectory=edge-agent"));
        let unit_path = unit_dir.path().join("edge-agent.service");
        std::fs::write(&unit_path, unit).expect("unit");
        if Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok()
        {
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&unit_path)
                .output()
                .expect("systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Outside a booted systemd the verifier also reports the missing target units and
            // the foreign architecture of the binary; anything about our unit's own lines is ours.
            let ours: Vec<_> = stderr
                .lines()
                .filter(|l| l.contains("edge-agent.service:"))
                .collect();
            assert!(ours.is_empty(), "systemd-analyze verify:\n{stderr}");
        } else {
            println!("systemd-analyze not available: unit not verified");
        }

        let tarball = cross_dir().join(format!(
            "edge-agent-{}-{arch}.tar.gz",
            env!("CARGO_PKG_VERSION")
        ));
        let listing = run(Command::new("tar").arg("-tzf").arg(&tarball));
        for path in [
            "./usr/bin/edge-agent",
            "./etc/edge-agent/agent.yaml",
            "./lib/systemd/system/edge-agent.service",
        ] {
            assert!(listing.contains(path), "tarball lacks {path}");
        }
        // Extracted over a root as INSTALL.md says (`tar -xzf … -C /`): the root keeps its
        // mode, and the service user (not root, not in root's group) can read the config.
        let scratch = tempfile::tempdir().expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            run(Command::new("tar")
                .arg("-xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(scratch.path()));
            let mode = |p: &Path| {
                std::fs::metadata(p)
                    .expect("extracted")
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(mode(scratch.path()), 0o755, "the root keeps 0755");
            for dir in ["etc", "etc/edge-agent", "usr/bin", "lib/systemd/system"] {
                assert_eq!(mode(&scratch.path().join(dir)), 0o755, "{dir}");
            }
            let config = mode(&scratch.path().join("etc/edge-agent/agent.yaml"));
            assert_eq!(
                config & 0o004,
                0o004,
                "others can read the config: {config:o}"
            );
        }
    }
}

/// A scratch root: this machine's own root seen through an overlay whose writes go to a tmpfs,
/// so `dpkg` and the maintainer scripts run (chrooted) against a real Debian system (its dpkg
/// database, adduser, ca-certificates) and change nothing of the host. `/run` is empty in it
/// (no systemd running), `/proc` is mounted.
struct ScratchRoot {
    _dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
    root: PathBuf,
}

impl ScratchRoot {
    fn new() -> ScratchRoot {
        let dir = tempfile::tempdir().expect("tempdir");
        let (changes, root) = (dir.path().join("changes"), dir.path().join("root"));
        let mut scratch = ScratchRoot {
            _dir: dir,
            mounts: Vec::new(),
            root: root.clone(),
        };
        std::fs::create_dir_all(&changes).expect("mkdir");
        std::fs::create_dir_all(&root).expect("mkdir");
        scratch.mount(&["-t", "tmpfs", "tmpfs"], &changes);
        for d in ["upper", "work"] {
            std::fs::create_dir_all(changes.join(d)).expect("mkdir");
        }
        let options = format!(
            "lowerdir=/,upperdir={},workdir={}",
            changes.join("upper").display(),
            changes.join("work").display()
        );
        scratch.mount(&["-t", "overlay", "overlay", "-o", &options], &root);
        scratch.mount(&["-t", "tmpfs", "tmpfs"], &root.join("run"));
        scratch.mount(&["-t", "proc", "proc"], &root.join("proc"));
        scratch
    }

    fn mount(&mut self, args: &[&str], at: &Path) {
        let out = Command::new("mount")
            .args(args)
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount {args:?} {} failed (the package test needs root and overlayfs): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(at.to_owned());
    }

    /// Runs `script` with `sh -c` in the root; its exit status and output.
    fn sh(&self, script: &str) -> (bool, String) {
        let out = Command::new("chroot")
            .arg(&self.root)
            .args(["sh", "-c", script])
            .output()
            .expect("chroot");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs `script`, which must succeed; its output.
    fn ok(&self, script: &str) -> String {
        let (ok, out) = self.sh(script);
        assert!(ok, "`{script}` failed in the scratch root:\n{out}");
        out
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        for at in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(at).status();
        }
    }
}

/// The .deb's whole life on a Debian system, with its maintainer scripts run for real (dpkg in
/// a chroot of a scratch root): install (the service user is created and can read the config,
/// the token and the users file; `/` keeps 0755), an upgrade over itself (the operator's config
/// and token stay), remove (the config and the user stay), reinstall, a reinstall after the
/// operator deleted the config, purge (config, state, user and group gone), and install again.
#[test]
fn the_packages_deb_installs_upgrades_removes_purges_and_reinstalls_in_a_scratch_root() {
    arm_binary("aarch64");
    let deb = std::fs::read_dir(cross_dir())
        .expect("target/cross")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("_arm64.deb"))
        .expect("an arm64 .deb in target/cross");
    let scratch = ScratchRoot::new();
    std::fs::copy(&deb, scratch.root.join("tmp/edge-agent.deb")).expect("copy the .deb");
    // The scripts are the same for every architecture; they never run the binary.
    let install = "dpkg --force-architecture -i /tmp/edge-agent.deb";
    let installed = || {
        scratch.ok("test -x /usr/bin/edge-agent");
        scratch.ok("getent passwd edge-agent && getent group edge-agent");
        for file in ["agent.yaml", "token", "users"] {
            let path = format!("/etc/edge-agent/{file}");
            assert_eq!(
                scratch.ok(&format!("stat -c '%a %U %G' {path}")).trim(),
                "640 root edge-agent",
                "{path}"
            );
            scratch.ok(&format!("runuser -u edge-agent -- cat {path} >/dev/null"));
        }
        assert_eq!(scratch.ok("stat -c %a /").trim(), "755", "/ keeps its mode");
    };
    scratch.ok(&format!("getent passwd edge-agent && exit 1; {install}"));
    installed();

    // The operator configures the gateway; an upgrade (here over itself) keeps it all.
    scratch.ok("echo '# the operator was here' >> /etc/edge-agent/agent.yaml");
    scratch.ok("echo the-real-token > /etc/edge-agent/token");
    scratch.ok(install);
    installed();
    assert!(
        scratch
            .ok("tail -n 1 /etc/edge-agent/agent.yaml")
            .contains("the operator")
    );
    assert_eq!(
        scratch.ok("cat /etc/edge-agent/token").trim(),
        "the-real-token"
    );

    // Remove: the program goes, the configuration and the user stay.
    scratch.ok("dpkg -r edge-agent");
    scratch.ok("test ! -e /usr/bin/edge-agent");
    scratch.ok("test -e /etc/edge-agent/agent.yaml && getent passwd edge-agent");
    scratch.ok(install);
    installed();

    // A gateway whose config was deleted still installs (dpkg does not bring a deleted
    // conffile back on upgrade).
    scratch.ok("rm /etc/edge-agent/agent.yaml");
    scratch.ok(install);

    // Purge: configuration, state, user and group are gone; a new install starts afresh.
    scratch.ok("mkdir -p /var/lib/edge-agent && touch /var/lib/edge-agent/buffer.db");
    scratch.ok("dpkg -P edge-agent");
    scratch.ok("test ! -e /etc/edge-agent && test ! -e /var/lib/edge-agent");
    scratch.ok("! getent passwd edge-agent && ! getent group edge-agent");
    scratch.ok(install);
    installed();
    assert_eq!(
        scratch.ok("cat /etc/edge-agent/token").trim(),
        "placeholder-token-replace-me"
    );
}
