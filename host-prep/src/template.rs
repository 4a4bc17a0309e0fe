//! Command templates: argv vectors with `{name}` placeholders, so that the
//! testbed and real deployments can start the destination QEMU (or reach the
//! destination host) differently.

use std::collections::BTreeMap;

/// Errors expanding a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// A `{name}` with no value.
    #[error("command template argument {arg:?}: unknown placeholder {{{name}}}")]
    Unknown {
        /// The argument.
        arg: String,
        /// The placeholder name.
        name: String,
    },
    /// A `{` without its `}`.
    #[error("command template argument {arg:?}: unclosed '{{'")]
    Unclosed {
        /// The argument.
        arg: String,
    },
    /// The template is empty.
    #[error("command template is empty")]
    Empty,
}

/// Expand every `{name}` in every argument; `{{` and `}}` are literal braces.
pub fn expand(
    argv: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, TemplateError> {
    if argv.is_empty() {
        return Err(TemplateError::Empty);
    }
    argv.iter().map(|a| expand_one(a, vars)).collect()
}

fn expand_one(arg: &str, vars: &BTreeMap<String, String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if let Some(t) = tail.strip_prefix('}') {
            out.push('}');
            rest = t;
        } else {
            let body = &tail[1..];
            let end = body.find('}').ok_or_else(|| TemplateError::Unclosed {
                arg: arg.to_string(),
            })?;
            let name = &body[..end];
            let val = vars.get(name).ok_or_else(|| TemplateError::Unknown {
                arg: arg.to_string(),
                name: name.to_string(),
            })?;
            out.push_str(val);
            rest = &body[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [
            ("vm", "web1"),
            ("tap:net0", "web1-n0"),
            ("incoming", "tcp:[::]:4444"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn expands_placeholders() {
        let argv: Vec<String> = [
            "q",
            "-netdev",
            "tap,id=n0,ifname={tap:net0},script=no",
            "-incoming",
            "{incoming}",
            "{{x}}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand(&argv, &vars()).unwrap();
        assert_eq!(out[2], "tap,id=n0,ifname=web1-n0,script=no");
        assert_eq!(out[4], "tcp:[::]:4444");
        assert_eq!(out[5], "{x}");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = expand(&["{tap:net9}".to_string()], &vars()).unwrap_err();
        assert_eq!(
            e,
            TemplateError::Unknown {
                arg: "{tap:net9}".into(),
                name: "tap:net9".into()
            }
        );
        assert!(matches!(
            expand(&["a{vm".to_string()], &vars()),
            Err(TemplateError::Unclosed { .. })
        ));
        assert_eq!(expand(&[], &vars()), Err(TemplateError::Empty));
    }
}
