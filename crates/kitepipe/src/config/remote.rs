//! `[[remote]]` rules: what the relay's gateway may run on which connectors.

use kitepipe_proto::message::RemoteClass;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::pki::{IdentityPattern, RemoteRule};

/// One `[[remote]]` table as written: `nodes = ["ci-*"]`, `ops = ["exec", "fs"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemoteRule {
    /// Node names or patterns.
    pub nodes: Vec<String>,
    /// Kinds of operations: `exec`, `fs`, `forward`, `all`.
    pub ops: Vec<String>,
}

impl RawRemoteRule {
    /// Parses the flag form `NODES:OPS`, e.g. `ci-*,laptop:exec,fs`.
    pub(crate) fn from_flag(text: &str) -> Result<RawRemoteRule, ConfigError> {
        let Some((nodes, ops)) = text.split_once(':') else {
            return Err(ConfigError::Invalid {
                what: "remote rule",
                value: text.to_string(),
                why: "expected NODES:OPS, e.g. 'ci-*,laptop:exec,fs'".into(),
            });
        };
        let list = |t: &str| t.split(',').map(|w| w.trim().to_string()).collect();
        Ok(RawRemoteRule {
            nodes: list(nodes),
            ops: list(ops),
        })
    }
}

/// Parses one `[[remote]]` rule.
pub(crate) fn parse_remote_rule(raw: &RawRemoteRule) -> Result<RemoteRule, ConfigError> {
    let invalid = |value: &str, why: String| ConfigError::Invalid {
        what: "remote rule",
        value: value.to_string(),
        why,
    };
    if raw.nodes.is_empty() {
        return Err(invalid(
            "nodes = []",
            "name at least one node or pattern".into(),
        ));
    }
    let nodes = raw
        .nodes
        .iter()
        .map(|text| IdentityPattern::parse(text).map_err(|err| invalid(text, err.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let joined = raw.ops.join(",");
    let ops = RemoteClass::parse_list(&joined).map_err(|why| invalid(&joined, why))?;
    Ok(RemoteRule { nodes, ops })
}
