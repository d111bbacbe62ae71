//! A memory cgroup for one child process: the streamed runs of vlmem and llama.cpp held to
//! the same RAM, page cache included (both cgroup versions charge a group for the page cache
//! its processes bring in).
//!
//! cgroup v2 (`cgroup2` mounted, `memory` among its controllers): a group under the mount's
//! root with `memory.max`; the peak is `memory.peak` (Linux 5.19+) and kills are `oom_kill`
//! in `memory.events`. cgroup v1 (a `cgroup` mount with the `memory` option): a group under
//! this process's own memory group (else the hierarchy's root) with `memory.limit_in_bytes`;
//! the peak is `memory.max_usage_in_bytes`, `memory.failcnt` counts the times the limit was
//! hit and `oom_kill` in `memory.oom_control` the kills. Making a group needs root (or a
//! delegated hierarchy); where it cannot be made, [`MemCgroup::create`] says why and the
//! suite leaves the held figures out.
//!
//! The child enters the group before it runs anything: it is started as
//! `sh -c 'echo $$ > GROUP/cgroup.procs && exec "$@"' sh PROGRAM ARGS...`
//! ([`MemCgroup::launcher`]), so every page it touches is charged to the group.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Which cgroup hierarchy holds the memory controller, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    /// cgroup v1: the memory controller's own mount.
    V1(PathBuf),
    /// cgroup v2: the unified mount.
    V2(PathBuf),
}

/// The memory controller's hierarchy among `/proc/self/mounts` lines: a v1 `cgroup` mount
/// whose options name `memory` first, else a `cgroup2` mount.
pub(crate) fn memory_hierarchy(mounts: &str) -> Option<Hierarchy> {
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (dir, fstype, options) = (f[1], f[2], f[3]);
        match fstype {
            "cgroup" if options.split(',').any(|o| o == "memory") => {
                return Some(Hierarchy::V1(PathBuf::from(dir)));
            }
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(dir)),
            _ => {}
        }
    }
    v2.map(Hierarchy::V2)
}

/// This process's group path in the hierarchy, from `/proc/self/cgroup` lines
/// (`ID:CONTROLLERS:PATH`): the v1 line whose controllers name `memory`, or the v2 line
/// (`0::PATH`).
pub(crate) fn own_group(proc_cgroup: &str, v1: bool) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if v1 {
            controllers.split(',').any(|c| c == "memory")
        } else {
            controllers.is_empty()
        };
        matches.then(|| path.trim().to_string())
    })
}

/// A limit file's value: bytes, or `None` for no limit (`max` in v2, or v1's "unlimited",
/// a value near `i64::MAX`).
pub(crate) fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    (v < 1 << 62).then_some(v)
}

/// The value of `key` in a flat keyed file (`memory.events`, `memory.oom_control`,
/// `memory.stat`: one `KEY VALUE` a line).
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        (f.next()? == key).then_some(())?;
        f.next()?.parse().ok()
    })
}

/// A memory cgroup made for one run, removed on drop.
#[derive(Debug)]
pub(crate) struct MemCgroup {
    dir: PathBuf,
    v2: bool,
    limit_bytes: u64,
}

/// What the group saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// The most memory charged at once (process memory and page cache).
    pub(crate) peak_bytes: Option<u64>,
    /// Times the limit was hit (v1 `memory.failcnt`; v2 `max` in `memory.events`).
    pub(crate) limit_hits: Option<u64>,
    /// Processes the kernel killed for memory in the group.
    pub(crate) oom_kills: Option<u64>,
}

impl MemCgroup {
    /// A new group named `name` whose memory (page cache included) is limited to
    /// `limit_bytes`; why not, when the memory controller is missing or the group cannot be
    /// made or limited (not root).
    pub(crate) fn create(name: &str, limit_bytes: u64) -> Result<Self, String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("/proc/self/mounts: {e}"))?;
        let hierarchy = memory_hierarchy(&mounts)
            .ok_or("no cgroup hierarchy with the memory controller is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let (root, v2) = match &hierarchy {
            Hierarchy::V1(root) => (root.clone(), false),
            Hierarchy::V2(root) => (root.clone(), true),
        };
        // v1: beside this process, inside its own group, where one can be made there; v2: at
        // the root (a v2 group with processes cannot hand the memory controller down).
        let mut parents = Vec::new();
        if !v2
            && let Some(path) = own_group(&own, true)
            && path != "/"
        {
            parents.push(root.join(path.trim_start_matches('/')));
        }
        parents.push(root.clone());
        let mut why = Vec::new();
        for parent in parents {
            if v2 {
                let control = parent.join("cgroup.subtree_control");
                let enabled = std::fs::read_to_string(&control)
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
                if !enabled && let Err(e) = std::fs::write(&control, "+memory") {
                    why.push(format!("{}: {e}", control.display()));
                    continue;
                }
            }
            let dir = parent.join(name);
            if let Err(e) = std::fs::create_dir(&dir) {
                why.push(format!("{}: {e}", dir.display()));
                continue;
            }
            let group = MemCgroup {
                dir,
                v2,
                limit_bytes,
            };
            let file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            let path = group.dir.join(file);
            if let Err(e) = std::fs::write(&path, limit_bytes.to_string()) {
                why.push(format!("{}: {e}", path.display()));
                continue;
            }
            match std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| parse_limit(&t))
            {
                // v1 rounds the limit to whole pages.
                Some(set) if set.abs_diff(limit_bytes) < 1 << 16 => return Ok(group),
                other => why.push(format!(
                    "{} reads {other:?} after writing {limit_bytes}",
                    path.display()
                )),
            }
        }
        Err(format!(
            "no memory cgroup could be made ({}): run as root, or delegate a cgroup",
            why.join("; ")
        ))
    }

    /// The limit set.
    pub(crate) fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// The group's folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A program and the arguments before the command it starts in the group: `sh -c
    /// 'echo $$ > GROUP/cgroup.procs && exec "$@"' sh`, the command's program and arguments
    /// to follow.
    pub(crate) fn launcher(&self) -> Vec<OsString> {
        let procs = self.dir.join("cgroup.procs");
        let mut script = OsString::from("echo $$ > '");
        script.push(procs.as_os_str());
        script.push("' && exec \"$@\"");
        vec!["sh".into(), "-c".into(), script, "sh".into()]
    }

    /// What the group saw so far.
    pub(crate) fn usage(&self) -> Usage {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).ok();
        if self.v2 {
            let events = read("memory.events").unwrap_or_default();
            Usage {
                peak_bytes: read("memory.peak").and_then(|t| t.trim().parse().ok()),
                limit_hits: keyed_value(&events, "max"),
                oom_kills: keyed_value(&events, "oom_kill"),
            }
        } else {
            Usage {
                peak_bytes: read("memory.max_usage_in_bytes").and_then(|t| t.trim().parse().ok()),
                limit_hits: read("memory.failcnt").and_then(|t| t.trim().parse().ok()),
                oom_kills: read("memory.oom_control").and_then(|t| keyed_value(&t, "oom_kill")),
            }
        }
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Empty once its process has exited; a process still in it keeps it.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory controller is found in v1 mounts (its own mount), in a v2-only system,
    /// and v1's wins on a hybrid one; nothing without one.
    #[test]
    fn the_memory_hierarchy_from_mounts() {
        let v1 = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0\n";
        assert_eq!(
            memory_hierarchy(v1),
            Some(Hierarchy::V1("/sys/fs/cgroup/memory".into()))
        );
        let v2 = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            memory_hierarchy(v2),
            Some(Hierarchy::V2("/sys/fs/cgroup".into()))
        );
        let hybrid = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0\n";
        assert!(matches!(memory_hierarchy(hybrid), Some(Hierarchy::V1(_))));
        // `memory` must be an option of its own, not part of another name.
        let none =
            "cgroup /sys/fs/cgroup/x cgroup rw,name=memoryless 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(memory_hierarchy(none), None);
    }

    /// This process's group: v1's memory line, v2's `0::` line.
    #[test]
    fn own_group_from_proc_self_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/user.slice/x\n";
        assert_eq!(own_group(text, true).as_deref(), Some("/process_api/abc"));
        assert_eq!(own_group(text, false).as_deref(), Some("/user.slice/x"));
        assert_eq!(own_group("5:cpu,memory:/a\n", true).as_deref(), Some("/a"));
        assert_eq!(own_group("3:cpuset:/\n", true), None);
    }

    /// Limits: bytes, v2's `max` and v1's page-rounded "unlimited" are no limit; other
    /// text is not a limit. Keyed files give their values by key.
    #[test]
    fn limit_and_keyed_text() {
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("lots"), None);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed_value(oom, "oom_kill"), Some(2));
        assert_eq!(keyed_value(oom, "under_oom"), Some(0));
        assert_eq!(keyed_value(oom, "oom"), None);
        let events = "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\n";
        assert_eq!(keyed_value(events, "max"), Some(17));
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
    }

    /// The launcher puts its shell into the group, then becomes the command.
    #[test]
    fn the_launcher_enters_the_group_then_execs() {
        let g = MemCgroup {
            dir: "/sys/fs/cgroup/memory/t".into(),
            v2: false,
            limit_bytes: 1 << 30,
        };
        let l = g.launcher();
        assert_eq!(l[0], "sh");
        assert_eq!(l[1], "-c");
        assert_eq!(
            l[2],
            "echo $$ > '/sys/fs/cgroup/memory/t/cgroup.procs' && exec \"$@\""
        );
        assert_eq!(l[3], "sh");
        // Dropping a group that was never made removes nothing and does not panic.
        drop(g);
    }
}
