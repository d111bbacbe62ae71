//! kill -9 during heavy swapping: `vlmem stress` with a 4 MiB host tier swaps into a folder
//! of ours; we wait until its swap file holds written blocks, SIGKILL it, and check that
//! nothing of the run is left in the folder (the swap files are O_TMPFILE, 0600, in a 0700
//! folder: never linked, so the kernel frees them with the last descriptor). Then a new run
//! in the same folder starts clean and passes its ledger check.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn stress(swap: &Path, seconds: &str, seed: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vlmem"));
    c.args([
        "stress",
        "--threads",
        "4",
        "--seconds",
        seconds,
        "--seed",
        seed,
        "--host-mem",
        "4MiB",
        "--json",
        "--disk-path",
    ])
    .arg(swap);
    c
}

/// Every entry under `dir`, recursively.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(entries(&p));
        }
        out.push(p);
    }
    out
}

/// The child's open files that live in `swap` (O_TMPFILE files show as "DIR/#inode
/// (deleted)" in /proc), with their metadata read through the descriptor.
fn swap_files_of(child: &Child, swap: &Path) -> Vec<(String, std::fs::Metadata)> {
    let fds = format!("/proc/{}/fd", child.id());
    let Ok(rd) = std::fs::read_dir(&fds) else {
        return Vec::new();
    };
    let prefix = swap.to_string_lossy().to_string();
    rd.filter_map(|e| {
        let p = e.ok()?.path();
        let target = std::fs::read_link(&p).ok()?.to_string_lossy().to_string();
        if !target.starts_with(&prefix) {
            return None;
        }
        let meta = std::fs::metadata(&p).ok()?;
        Some((target, meta))
    })
    .collect()
}

#[test]
fn kill_9_during_swapping_leaves_nothing_readable_and_a_new_run_starts_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let swap = tmp.path().join("swap");
    for trial in 0..3u64 {
        let mut child = stress(&swap, "120", &(trial + 1).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the swap file has blocks written (the run is swapping), then wait a
        // little more (a different moment in each trial) so the kill lands mid-swap.
        let started = Instant::now();
        let (target, meta) = loop {
            if let Some((t, m)) = swap_files_of(&child, &swap)
                .into_iter()
                .find(|(_, m)| m.blocks() > 0)
            {
                break (t, m);
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("trial {trial}: no swap file with written blocks after 60 s");
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "trial {trial}: stress ended early"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // While running: the file is unlinked (O_TMPFILE), 0600, in a 0700 folder, and the
        // folder lists nothing.
        assert!(target.contains("(deleted)"), "{target}");
        assert_eq!(meta.mode() & 0o777, 0o600, "{target}");
        assert_eq!(meta.nlink(), 0, "{target}");
        assert_eq!(
            std::fs::metadata(&swap).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(entries(&swap).is_empty(), "{:?}", entries(&swap));
        std::thread::sleep(Duration::from_millis(150 * trial));
        let blocks_before = swap_files_of(&child, &swap)
            .iter()
            .map(|(_, m)| m.blocks())
            .sum::<u64>();
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "trial {trial}: {status:?}");
        assert!(blocks_before > 0);
        // Nothing of the run is left under our temp folder: no file, no folder but `swap`.
        assert!(
            entries(tmp.path()) == vec![swap.clone()],
            "trial {trial}: left behind: {:?}",
            entries(tmp.path())
        );
        assert!(
            !Path::new(&format!("/proc/{}", child.id()))
                .join("fd")
                .exists()
        );
    }
    // A new run in the same folder starts clean and passes its ledger check.
    let out = stress(&swap, "2", "9").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "overlaps",
        "lost",
        "corrupted",
        "stats_mismatch",
        "deadlocks",
        "stalls",
    ] {
        assert_eq!(r[field], 0, "{field}: {r}");
    }
    assert!(r["swap_outs"].as_u64().unwrap() > 0, "{r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
    assert!(entries(&swap).is_empty(), "{:?}", entries(&swap));
}
