//! A file system of its own for one run: ext4 on a loop device, so that what the agent's
//! writes cost the flash is counted where the flash would see it, by the block layer
//! (`/sys/block/loopN/stat`: sectors written, the file system's journal included).
//!
//! Why not `/proc/<pid>/io` write_bytes alone: the kernel counts it when a page of the page
//! cache turns dirty, a whole folio at a time. Kernels with large folios for ext4's files (the
//! bench VM's 6.18) keep a file read ahead or written in large pieces in folios of up to 2 MiB,
//! so one 1 KiB SQLite page written into such a file counts as up to 2 MiB there, while the
//! device receives one 4 KiB block. 200 writes of 260 B with an fdatasync after each, here:
//! 2 MiB each in write_bytes after the file was written with one 8 MiB write, 4 KiB after
//! 4 KiB writes, and 4.5 KiB each at the device in both cases.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted ext4 on a loop device over a sparse image; unmounted and detached on drop.
pub struct LoopDisk {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The loop device's name (`loop3`).
    device: String,
}

impl LoopDisk {
    /// An ext4 of `gib` GiB in an image under `dir`, mounted at `dir/disk`. `None`, with the
    /// reason printed, where this cannot be done (not root, no loop devices).
    pub fn mount(dir: &Path, gib: u64) -> Option<LoopDisk> {
        let image = dir.join("disk.img");
        let mount = dir.join("disk");
        let image_made = std::fs::create_dir_all(&mount)
            .and_then(|()| std::fs::File::create(&image))
            .and_then(|f| f.set_len(gib << 30));
        if let Err(e) = image_made {
            eprintln!(
                "flash: no disk image at {} ({e}); device bytes not measured",
                image.display()
            );
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "flash: no loop device ({}); device bytes not measured",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let device = path.trim_start_matches("/dev/").to_owned();
        let disk = LoopDisk {
            mount: mount.clone(),
            device,
        };
        // Inode tables and the journal initialised now, not by a background thread whose
        // writes would count as the agent's.
        let ok = |cmd: &mut Command| cmd.status().is_ok_and(|s| s.success());
        if !ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&path))
            || !ok(Command::new("mount").arg(&path).arg(&mount))
        {
            eprintln!("flash: mkfs.ext4 or mount of {path} failed; device bytes not measured");
            return None;
        }
        Some(disk)
    }

    /// Bytes the device received so far, after writing back what the page cache holds;
    /// `None` if its statistics cannot be read.
    pub fn written(&self) -> Option<u64> {
        let _ = Command::new("sync").arg("-f").arg(&self.mount).status();
        std::fs::read_to_string(format!("/sys/block/{}/stat", self.device))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(6)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|sectors| sectors * 512)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup")
            .args(["-d", &format!("/dev/{}", self.device)])
            .status();
    }
}
