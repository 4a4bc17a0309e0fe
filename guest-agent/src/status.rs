//! `guest-agent status`: asks the running daemon over its unix socket and
//! prints the answer (JSON, or a short human-readable summary).

use std::path::Path;

use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tokio::net::UnixStream;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The socket is missing or refused the connection.
    #[error("cannot reach the agent at {path}: {source} (is guest-agent running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer could not be read.
    #[error("reading the agent's answer: {0}")]
    Read(std::io::Error),
    /// The answer is not JSON.
    #[error("the agent's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Fetches the daemon's status document.
pub async fn query(path: &Path) -> Result<Value, StatusError> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| StatusError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .await
        .map_err(StatusError::Read)?;
    Ok(serde_json::from_str(&buf)?)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn us_to_ms(v: &Value) -> String {
    v.as_u64()
        .map(|u| format!("{:.1} ms", u as f64 / 1000.0))
        .unwrap_or_else(|| "-".to_owned())
}

/// A human-readable rendering of the status document.
pub fn render(doc: &Value) -> String {
    let st = &doc["status"];
    let mut out = String::new();
    out.push_str(&format!("HoA:            {}\n", s(&st["hoa"])));
    out.push_str(&format!("active MoA:     {}\n", s(&st["active_moa"])));
    let standby: Vec<String> = st["standby_moas"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "standby MoAs:   {}\n",
        if standby.is_empty() {
            "-".to_owned()
        } else {
            standby.join(", ")
        }
    ));
    let b = &st["bicast"];
    if b.is_object() {
        out.push_str(&format!(
            "bicast:         {} -> {} via {}\n",
            s(&b["from_ifname"]),
            s(&b["to_ifname"]),
            s(&b["via"])
        ));
    }
    out.push_str(&format!(
        "binding:        seq {}  expires in {} s{}\n",
        s(&st["binding_seq"]),
        s(&st["binding_expires_in_s"]),
        if st["registration_pending"].as_bool() == Some(true) {
            "  (update pending)"
        } else {
            ""
        }
    ));
    out.push_str("interfaces:\n");
    for i in st["interfaces"].as_array().into_iter().flatten() {
        let state = &i["state"];
        let detail = match state["state"].as_str() {
            Some("active") | Some("standby") => format!(
                "{} via {} (prefix {}/{})",
                s(&state["moa"]),
                s(&state["router"]),
                s(&state["prefix"]),
                s(&state["prefix_len"])
            ),
            Some("unconfigured") => format!("{} RS sent", s(&state["rs_sent"])),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {:<10} {:<9} {:<12} {}\n",
            s(&i["name"]),
            s(&i["role"]),
            s(&state["state"]),
            detail
        ));
    }
    out.push_str("peers:\n");
    match st["peers"].as_object() {
        Some(p) if !p.is_empty() => {
            for (hoa, b) in p {
                out.push_str(&format!(
                    "  {:<24} active {}  standby {}  seq {}\n",
                    hoa,
                    s(&b["active"]),
                    s(&b["standby"]),
                    s(&b["seq"])
                ));
            }
        }
        _ => out.push_str("  -\n"),
    }
    out.push_str("last handovers:\n");
    match st["handovers"].as_array() {
        Some(h) if !h.is_empty() => {
            for x in h.iter().rev().take(5) {
                out.push_str(&format!(
                    "  {:<10} -> {}  switch {}  IMS ack {}  peers acked {} ({} notified)\n",
                    s(&x["kind"]),
                    s(&x["moa"]),
                    us_to_ms(&x["switch_us"]),
                    us_to_ms(&x["ims_ack_us"]),
                    us_to_ms(&x["peers_acked_us"]),
                    s(&x["peers_notified"])
                ));
            }
        }
        _ => out.push_str("  -\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn renders_a_status_document() {
        let mut doc = serde_json::json!({
            "status": {
                "hoa": "2001:db8:ff::1",
                "active_moa": "2001:db8:b::1",
                "standby_moas": [],
                "bicast": {"from_ifname": "eth1", "to_ifname": "eth0", "via": "fe80::a"},
                "binding_seq": 12,
                "binding_expires_in_s": 590,
                "registration_pending": false,
                "interfaces": [
                    {"name": "eth0", "role": "primary", "state": {"state": "down"}},
                    {"name": "eth1", "role": "secondary", "state": {"state": "active",
                        "moa": "2001:db8:b::1", "router": "fe80::b", "prefix": "2001:db8:b::", "prefix_len": 64}}
                ],
                "peers": {"2001:db8:ff::2": {"active": "2001:db8:c::2", "standby": [], "seq": 4}},
                "handovers": [{"kind": "standby", "moa": "2001:db8:b::1", "switch_us": 0,
                    "ims_ack_us": 1500, "peers_acked_us": 2500, "peers_notified": 1}]
            }
        });
        let r = render(&doc);
        assert!(r.contains("HoA:            2001:db8:ff::1"));
        assert!(r.contains("eth1       secondary active       2001:db8:b::1 via fe80::b"));
        assert!(r.contains("2001:db8:ff::2"));
        assert!(r.contains("IMS ack 1.5 ms"));
        assert!(r.contains("seq 12"));
        assert!(r.contains("bicast:         eth1 -> eth0 via fe80::a"));
        doc["status"]["bicast"] = Value::Null;
        assert!(!render(&doc).contains("bicast:"));
    }

    #[tokio::test]
    async fn missing_socket_is_a_clear_error() {
        let e = query(Path::new("/nonexistent/m6a.sock")).await.unwrap_err();
        assert!(e.to_string().contains("is guest-agent running?"));
    }
}
