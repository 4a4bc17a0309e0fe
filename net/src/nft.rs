//! nftables through the `nft` binary.
//!
//! * [`apply`]: a whole ruleset text in one atomic transaction (`nft -f -`).
//! * [`delete_table`], [`list_table`]: table housekeeping.
//! * [`NftSession`]: one long-lived `nft -i` child fed through a pipe, for
//!   the critical path (a peer moved: update one map element). Each call is
//!   one line, which `nft` runs as **one transaction**, so a
//!   `delete element ...; add element ...` pair replaces a value atomically.
//!   After each line the session writes `describe meta mark`, whose known
//!   answer marks the end of the output; anything with `Error:` before it is
//!   the command's error. Measured on the test machine: ~0.12 ms per element
//!   update, against several ms for one `nft -f -` process per update. If
//!   `nft -i` cannot be started, the session falls back to one `nft -f -` per
//!   call ([`NftSession::is_interactive`] tells which).
//!
//! Processes run in the network namespace of the calling thread.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mat6_net::nft::NftError> {
//! use mat6_net::nft::{self, Family, NftSession};
//! nft::apply("table ip6 mat6 {\n map peer_out {\n  type ipv6_addr : ipv6_addr\n }\n}\n").await?;
//! let mut s = NftSession::start().await?;
//! s.map_set(Family::Ip6, "mat6", "peer_out", "2001:db8:100::7", "2001:db8:b::7").await?;
//! s.map_delete(Family::Ip6, "mat6", "peer_out", "2001:db8:100::7").await?;
//! nft::delete_table(Family::Ip6, "mat6").await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin, Command};

/// Path of the `nft` binary (found through `PATH`).
pub const NFT: &str = "nft";

/// How long one command may take before the session is declared dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const MARKER_CMD: &str = "describe meta mark";
const MARKER_OUT: &str =
    "meta expression, datatype mark (packet mark) (basetype integer), 32 bits\n";

/// Errors. Command errors carry what `nft` printed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started (not installed? not root?).
    #[error("cannot run nft: {0}")]
    Spawn(#[source] io::Error),
    /// Talking to the `nft` process failed.
    #[error("nft i/o: {0}")]
    Io(#[source] io::Error),
    /// `nft` rejected the command; `stderr` is its message.
    #[error("nft rejected `{cmd}`: {stderr}")]
    Command {
        /// The command (first 200 bytes of a ruleset).
        cmd: String,
        /// What nft printed.
        stderr: String,
    },
    /// The interactive session did not answer in time (it has been killed).
    #[error("nft session did not answer `{cmd}` within {timeout:?}")]
    Timeout {
        /// The command.
        cmd: String,
        /// The limit.
        timeout: Duration,
    },
    /// The interactive session ended; output seen so far attached.
    #[error("nft session ended unexpectedly: {output}")]
    SessionEnded {
        /// Output seen.
        output: String,
    },
    /// A name or element that could break out of its place in the command.
    #[error("invalid nft argument {0:?}")]
    BadArgument(String),
}

impl NftError {
    /// The kernel said the object exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        matches!(self, NftError::Command { stderr, .. } if stderr.contains("File exists"))
    }

    /// The kernel said the object does not exist (ENOENT).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NftError::Command { stderr, .. } if stderr.contains("No such file or directory"))
    }
}

/// An nftables address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// `ip`
    Ip,
    /// `ip6`
    Ip6,
    /// `inet`
    Inet,
    /// `bridge`
    Bridge,
    /// `netdev`
    Netdev,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
        })
    }
}

/// Checks a table/set/map/chain name: `[A-Za-z_][A-Za-z0-9_-]*`, <= 64 bytes.
pub fn check_ident(name: &str) -> Result<&str, NftError> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(name)
    } else {
        Err(NftError::BadArgument(name.to_owned()))
    }
}

/// Checks an element expression (an address, `a . b`, a prefix, a number):
/// no characters that end or nest a command.
pub fn check_elem(e: &str) -> Result<&str, NftError> {
    let bad = e.trim().is_empty()
        || e.len() > 256
        || e.chars()
            .any(|c| matches!(c, ';' | '{' | '}' | '\n' | '\r' | '#' | '"' | '\\'));
    if bad {
        Err(NftError::BadArgument(e.to_owned()))
    } else {
        Ok(e)
    }
}

fn summary(s: &str) -> String {
    let mut t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        t.push_str("...");
    }
    t.replace('\n', " ")
}

/// Runs `nft -f -` with `ruleset` on stdin: the whole text is one atomic
/// transaction. Returns stdout.
pub async fn apply(ruleset: &str) -> Result<String, NftError> {
    run_nft(&["-f", "-"], Some(ruleset), ruleset).await
}

/// Blocking variant of [`apply`] (for synchronous callers and tests).
pub fn apply_blocking(ruleset: &str) -> Result<String, NftError> {
    use std::io::Write;
    let mut child = std::process::Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).map_err(NftError::Io)?;
    }
    let out = child.wait_with_output().map_err(NftError::Io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Command {
            cmd: summary(ruleset),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

async fn run_nft(args: &[&str], stdin: Option<&str>, what: &str) -> Result<String, NftError> {
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(NftError::Io)?;
        drop(pipe);
    }
    let out = child.wait_with_output().await.map_err(NftError::Io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Command {
            cmd: summary(what),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Deletes a table. Returns `false` if it did not exist.
pub async fn delete_table(family: Family, table: &str) -> Result<bool, NftError> {
    let cmd = format!("delete table {family} {}", check_ident(table)?);
    match run_nft(&[&cmd], None, &cmd).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// `nft list table FAMILY NAME`.
pub async fn list_table(family: Family, table: &str) -> Result<String, NftError> {
    let cmd = format!("list table {family} {}", check_ident(table)?);
    run_nft(&[&cmd], None, &cmd).await
}

/// Does the table exist?
pub async fn table_exists(family: Family, table: &str) -> Result<bool, NftError> {
    match list_table(family, table).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// One `nft -f -` per batch of elements: `add element` / `delete element`.
pub async fn map_add(
    family: Family,
    table: &str,
    map: &str,
    elems: &[(&str, &str)],
) -> Result<(), NftError> {
    let body = join_pairs(elems)?;
    let cmd = format!(
        "add element {family} {} {} {{ {body} }}\n",
        check_ident(table)?,
        check_ident(map)?
    );
    apply(&cmd).await.map(drop)
}

/// Deletes map or set elements by key, in one transaction.
pub async fn elements_delete(
    family: Family,
    table: &str,
    set: &str,
    keys: &[&str],
) -> Result<(), NftError> {
    let body = join_keys(keys)?;
    let cmd = format!(
        "delete element {family} {} {} {{ {body} }}\n",
        check_ident(table)?,
        check_ident(set)?
    );
    apply(&cmd).await.map(drop)
}

/// Adds set elements in one transaction.
pub async fn set_add(
    family: Family,
    table: &str,
    set: &str,
    elems: &[&str],
) -> Result<(), NftError> {
    let body = join_keys(elems)?;
    let cmd = format!(
        "add element {family} {} {} {{ {body} }}\n",
        check_ident(table)?,
        check_ident(set)?
    );
    apply(&cmd).await.map(drop)
}

fn join_pairs(elems: &[(&str, &str)]) -> Result<String, NftError> {
    if elems.is_empty() {
        return Err(NftError::BadArgument("empty element list".into()));
    }
    let mut v = Vec::with_capacity(elems.len());
    for (k, val) in elems {
        v.push(format!("{} : {}", check_elem(k)?, check_elem(val)?));
    }
    Ok(v.join(", "))
}

fn join_keys(keys: &[&str]) -> Result<String, NftError> {
    if keys.is_empty() {
        return Err(NftError::BadArgument("empty element list".into()));
    }
    let mut v = Vec::with_capacity(keys.len());
    for k in keys {
        v.push(check_elem(k)?);
    }
    Ok(v.join(", "))
}

/// A running `nft -i`: its stdin, and a pipe carrying its stdout and stderr.
#[derive(Debug)]
struct Interactive {
    child: Child,
    stdin: ChildStdin,
    out: pipe::Receiver,
    buf: Vec<u8>,
}

impl Interactive {
    async fn spawn(timeout: Duration) -> Result<Interactive, NftError> {
        let (tx, rx) = pipe::pipe().map_err(NftError::Io)?;
        let tx: OwnedFd = tx.into_blocking_fd().map_err(NftError::Io)?;
        let tx2 = tx.try_clone().map_err(NftError::Io)?;
        let mut child = Command::new(NFT)
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(tx))
            .stderr(Stdio::from(tx2))
            .kill_on_drop(true)
            .spawn()
            .map_err(NftError::Spawn)?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| NftError::Io(io::Error::other("nft -i has no stdin pipe")))?;
        let mut s = Interactive {
            child,
            stdin,
            out: rx,
            buf: Vec::new(),
        };
        // Handshake: the marker must come back, proving the protocol works.
        let out = s.exec("", timeout).await?;
        if !out.trim().is_empty() {
            return Err(NftError::SessionEnded { output: out });
        }
        Ok(s)
    }

    /// Writes `line` (may be empty) and the marker; returns the output before
    /// the marker.
    async fn exec(&mut self, line: &str, timeout: Duration) -> Result<String, NftError> {
        let mut input = String::with_capacity(line.len() + 24);
        if !line.is_empty() {
            input.push_str(line);
            input.push('\n');
        }
        input.push_str(MARKER_CMD);
        input.push('\n');
        let fut = async {
            self.stdin
                .write_all(input.as_bytes())
                .await
                .map_err(NftError::Io)?;
            self.stdin.flush().await.map_err(NftError::Io)?;
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(pos) = find(&self.buf, MARKER_OUT.as_bytes()) {
                    let out = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                    self.buf.drain(..pos + MARKER_OUT.len());
                    return Ok(out);
                }
                let n = self.out.read(&mut chunk).await.map_err(NftError::Io)?;
                if n == 0 {
                    return Err(NftError::SessionEnded {
                        output: String::from_utf8_lossy(&self.buf).into_owned(),
                    });
                }
                self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(NftError::Timeout {
                cmd: summary(line),
                timeout,
            }),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Output before the marker: an error if nft printed `Error:`.
fn check_output(cmd: &str, out: String) -> Result<String, NftError> {
    if out.contains("Error:") {
        Err(NftError::Command {
            cmd: summary(cmd),
            stderr: out.trim().to_owned(),
        })
    } else {
        Ok(out)
    }
}

/// A long-lived nft session for frequent small updates (see the module
/// documentation). Not `Clone`: wrap it in a `tokio::sync::Mutex` to share.
#[derive(Debug)]
pub struct NftSession {
    inter: Option<Interactive>,
    want_interactive: bool,
    timeout: Duration,
    /// What this session last wrote per (family, table, map): key -> value,
    /// used to choose between `add` and `delete; add`.
    known: BTreeMap<(Family, String, String), BTreeMap<String, String>>,
}

impl NftSession {
    /// Starts `nft -i`; falls back to one `nft -f -` per call if that fails
    /// (logged as a warning). Fails only if `nft` cannot run at all.
    pub async fn start() -> Result<NftSession, NftError> {
        let mut s = NftSession {
            inter: None,
            want_interactive: true,
            timeout: DEFAULT_TIMEOUT,
            known: BTreeMap::new(),
        };
        match Interactive::spawn(s.timeout).await {
            Ok(i) => s.inter = Some(i),
            Err(NftError::Spawn(e)) => return Err(NftError::Spawn(e)),
            Err(e) => {
                tracing::warn!(error = %e, "nft -i unusable; falling back to nft -f - per update");
                s.want_interactive = false;
            }
        }
        Ok(s)
    }

    /// A session that always runs one `nft -f -` per call (the fallback;
    /// also what the latency comparison measures).
    pub fn one_shot() -> NftSession {
        NftSession {
            inter: None,
            want_interactive: false,
            timeout: DEFAULT_TIMEOUT,
            known: BTreeMap::new(),
        }
    }

    /// Sets the per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Is a `nft -i` child serving the calls?
    pub fn is_interactive(&self) -> bool {
        self.inter.is_some()
    }

    /// The PID of the `nft -i` child, if any.
    pub fn pid(&self) -> Option<u32> {
        self.inter.as_ref().and_then(|i| i.child.id())
    }

    /// Runs one line of commands (separated by `;`) as one transaction.
    /// Newlines are refused (they would split the transaction); use
    /// [`apply`] for multi-line rulesets. Returns nft's output (for `list`).
    /// A dead `nft -i` is restarted once.
    pub async fn run(&mut self, line: &str) -> Result<String, NftError> {
        if line.contains('\n') || line.contains('\r') {
            return Err(NftError::BadArgument(summary(line)));
        }
        if !self.want_interactive {
            return apply(&format!("{line}\n")).await;
        }
        for attempt in 0..2 {
            if self.inter.is_none() {
                self.inter = Some(Interactive::spawn(self.timeout).await?);
            }
            let Some(inter) = self.inter.as_mut() else {
                continue;
            };
            match inter.exec(line, self.timeout).await {
                Ok(out) => return check_output(line, out),
                Err(
                    e
                    @ (NftError::Timeout { .. } | NftError::SessionEnded { .. } | NftError::Io(_)),
                ) => {
                    tracing::warn!(error = %e, attempt, "nft session failed; restarting");
                    self.inter = None; // kill_on_drop ends the child
                    if attempt == 1 || matches!(e, NftError::Timeout { .. }) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(NftError::SessionEnded {
            output: String::new(),
        })
    }

    /// Sets `key -> value` in a map, replacing an existing value atomically
    /// (`delete element; add element` in one transaction).
    pub async fn map_set(
        &mut self,
        family: Family,
        table: &str,
        map: &str,
        key: &str,
        value: &str,
    ) -> Result<(), NftError> {
        self.map_set_many(family, table, map, &[(key, value)]).await
    }

    /// Sets several `key -> value` pairs in one transaction.
    pub async fn map_set_many(
        &mut self,
        family: Family,
        table: &str,
        map: &str,
        elems: &[(&str, &str)],
    ) -> Result<(), NftError> {
        check_ident(table)?;
        check_ident(map)?;
        let pairs = join_pairs(elems)?;
        let id = (family, table.to_owned(), map.to_owned());
        let known = self.known.get(&id);
        let existing: Vec<&str> = elems
            .iter()
            .filter(|(k, _)| known.is_some_and(|m| m.contains_key(*k)))
            .map(|(k, _)| *k)
            .collect();
        let add = format!("add element {family} {table} {map} {{ {pairs} }}");
        let first = if existing.is_empty() {
            add.clone()
        } else {
            format!(
                "delete element {family} {table} {map} {{ {} }}; {add}",
                join_keys(&existing)?
            )
        };
        let r = match self.run(&first).await {
            Ok(_) => Ok(()),
            // Our knowledge was stale (or the map was changed by someone else):
            // fall back to the other form, then to per-element replacement.
            Err(e) if e.is_exists() || e.is_not_found() => {
                self.known.remove(&id);
                let all: Vec<&str> = elems.iter().map(|(k, _)| *k).collect();
                let replace_all = format!(
                    "delete element {family} {table} {map} {{ {} }}; {add}",
                    join_keys(&all)?
                );
                match self.run(&replace_all).await {
                    Ok(_) => Ok(()),
                    Err(e2) if e2.is_not_found() => self.run(&add).await.map(drop),
                    Err(e2) => Err(e2),
                }
            }
            Err(e) => Err(e),
        };
        if r.is_ok() {
            let m = self.known.entry(id).or_default();
            for (k, v) in elems {
                m.insert((*k).to_owned(), (*v).to_owned());
            }
        }
        r
    }

    /// Deletes a map element. Returns `false` if it was not there.
    pub async fn map_delete(
        &mut self,
        family: Family,
        table: &str,
        map: &str,
        key: &str,
    ) -> Result<bool, NftError> {
        let line = format!(
            "delete element {family} {} {} {{ {} }}",
            check_ident(table)?,
            check_ident(map)?,
            check_elem(key)?
        );
        let id = (family, table.to_owned(), map.to_owned());
        if let Some(m) = self.known.get_mut(&id) {
            m.remove(key);
        }
        match self.run(&line).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds an element to a set (no error if it is already there).
    pub async fn set_add(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        elem: &str,
    ) -> Result<(), NftError> {
        let line = format!(
            "add element {family} {} {} {{ {} }}",
            check_ident(table)?,
            check_ident(set)?,
            check_elem(elem)?
        );
        self.run(&line).await.map(drop)
    }

    /// Deletes an element from a set. Returns `false` if it was not there.
    pub async fn set_delete(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        elem: &str,
    ) -> Result<bool, NftError> {
        let line = format!(
            "delete element {family} {} {} {{ {} }}",
            check_ident(table)?,
            check_ident(set)?,
            check_elem(elem)?
        );
        match self.run(&line).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Forgets what this session believes a table's maps hold (call after
    /// re-applying the table's ruleset).
    pub fn forget_table(&mut self, family: Family, table: &str) {
        self.known
            .retain(|(f, t, _), _| !(*f == family && t == table));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn idents_and_elements_are_checked() {
        assert!(check_ident("mat6").is_ok());
        assert!(check_ident("peer_out").is_ok());
        assert!(check_ident("_x-1").is_ok());
        for bad in ["", "1abc", "a b", "a;b", "a}", &"x".repeat(65)] {
            assert!(check_ident(bad).is_err(), "{bad:?}");
        }
        assert!(check_elem("2001:db8::1").is_ok());
        assert!(check_elem("2001:db8::/64 . 22").is_ok());
        for bad in ["", " ", "::1 }; flush ruleset", "::1\n", "a # c", "\"x\""] {
            assert!(check_elem(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_classify_kernel_answers() {
        let e = NftError::Command {
            cmd: "x".into(),
            stderr: "Error: Could not process rule: File exists".into(),
        };
        assert!(e.is_exists() && !e.is_not_found());
        let e = NftError::Command {
            cmd: "x".into(),
            stderr: "Error: Could not process rule: No such file or directory".into(),
        };
        assert!(e.is_not_found() && !e.is_exists());
        assert!(check_output("x", "table ip6 t {}\n".into()).is_ok());
        assert!(check_output("x", "Error: syntax error\n".into()).is_err());
    }

    #[test]
    fn pairs_and_summary() {
        assert_eq!(
            join_pairs(&[("::1", "::2"), ("::3", "::4")]).unwrap(),
            "::1 : ::2, ::3 : ::4"
        );
        assert!(join_pairs(&[]).is_err());
        assert!(join_pairs(&[("::1", "::2 }")]).is_err());
        assert_eq!(summary("a\nb"), "a b");
        assert!(summary(&"x".repeat(300)).ends_with("..."));
        assert_eq!(find(b"abcdef", b"cd"), Some(2));
        assert_eq!(find(b"abc", b"x"), None);
    }

    #[test]
    fn family_names() {
        assert_eq!(Family::Ip6.to_string(), "ip6");
        assert_eq!(Family::Inet.to_string(), "inet");
        assert_eq!(Family::Bridge.to_string(), "bridge");
    }
}
