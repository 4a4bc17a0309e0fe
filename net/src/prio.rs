//! CPU priority (nice value) of this process's threads and of a child.
//!
//! On Linux the nice value belongs to each thread, so lowering a
//! multi-threaded daemon's priority means setting it on every thread in
//! `/proc/self/task`; threads started later inherit the value of the thread
//! that starts them.
//!
//! ```no_run
//! let before = mat6_net::prio::own_nice()?;
//! mat6_net::prio::set_own_nice(19)?;
//! mat6_net::prio::set_own_nice(before)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;

/// The nice value range Linux accepts.
pub const NICE_RANGE: std::ops::RangeInclusive<i32> = -20..=19;

/// This process's nice value (its main thread's, from `/proc/self/stat`).
pub fn own_nice() -> io::Result<i32> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    parse_stat_nice(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/self/stat"))
}

/// The nice field (the 19th) of a `/proc/<pid>/stat` line. The command
/// name (2nd field) may hold spaces and parentheses, so fields are counted
/// after its last `)`.
fn parse_stat_nice(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, nice is field 19.
    rest.split_ascii_whitespace().nth(16)?.parse().ok()
}

/// Sets `nice` on every thread of this process; returns how many threads
/// were changed. Raising the priority back (a lower value) needs
/// `CAP_SYS_NICE` or a matching `RLIMIT_NICE`.
pub fn set_own_nice(nice: i32) -> io::Result<usize> {
    check(nice)?;
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        match sys::set_nice(tid, nice) {
            Ok(()) => n += 1,
            // A thread that ended since the listing.
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sets `nice` on process (or thread) `pid`.
pub fn set_nice(pid: u32, nice: i32) -> io::Result<()> {
    check(nice)?;
    sys::set_nice(pid, nice)
}

fn check(nice: i32) -> io::Result<()> {
    if NICE_RANGE.contains(&nice) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("nice value {nice} outside -20..=19"),
        ))
    }
}

mod sys {
    #![allow(unsafe_code)]
    use std::io;

    use nix::errno::Errno;
    use nix::libc;

    pub(super) fn set_nice(pid: u32, nice: i32) -> io::Result<()> {
        // SAFETY: setpriority takes plain integers and touches no memory of
        // ours; an invalid pid or value is reported through errno.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, nice) };
        Errno::result(r).map(drop).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nice_field_counts_after_the_command_name() {
        let line = "4242 (guest agent) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    5 3 0 0 39 19 4 0 123 456 789";
        assert_eq!(parse_stat_nice(line), Some(19));
        assert_eq!(parse_stat_nice("1 (init) S 0"), None);
        assert_eq!(parse_stat_nice("garbage"), None);
    }

    #[test]
    fn own_nice_reads_and_out_of_range_is_refused() {
        assert!(NICE_RANGE.contains(&own_nice().unwrap()));
        assert_eq!(
            set_own_nice(20).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            set_nice(1, -21).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Setting the value it already has is always allowed.
        let n = own_nice().unwrap();
        assert!(set_own_nice(n).unwrap() >= 1);
    }
}
