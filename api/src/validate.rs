//! The full validation of an agent config: every check the agent makes before it ships a
//! line, in one place, run by the agent at start, by the operator before any node moves,
//! and by `logpipe-operator validate` in a pull request.
//!
//! Flow: [`config`] walks the document and returns every [`Problem`] it finds, each with
//! the field path (`pipeline[2].regex`, `relabel[0].targetLabel`) and a reason a person
//! can act on.
//!
//! Guarantees:
//! - regexes are compiled and relabel rules built by the code the agent runs
//!   ([`stage_regex`], [`crate::relabel::check_rule`]), so what passes here compiles there;
//! - label names follow Loki's rule `[a-zA-Z_][a-zA-Z0-9_]*`, and a name this config adds
//!   to a stream may not start with `__` (reserved; relabelling removes such labels);
//! - tenants follow Loki's tenant ID rules, as the API server's CEL rule does.
//!
//! Caveats: file paths (auth, TLS) are not opened here; the agent reports a missing file
//! when it starts.

use std::fmt;

use regex::Regex;

use crate::config::{AgentConfig, LimitStage, Stage, TenantFrom, TenantSource};
use crate::relabel::{self, is_valid_label_name};
use crate::timeformat::TimeFormat;

/// One thing wrong with a config: where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Everything wrong with `config`, in document order; empty when the agent can run it.
pub fn config(config: &AgentConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut report = |field: String, result: Result<(), String>| {
        if let Err(message) = result {
            problems.push(Problem { field, message });
        }
    };
    let loki = &config.loki;
    report("loki.url".into(), push_url(&loki.url));
    report("loki.tenant".into(), tenant(&loki.tenant));
    if let Some(from) = &loki.tenant_from {
        report("loki.tenantFrom".into(), tenant_from(from));
    }
    report("loki.batchBytes".into(), at_least_one(loki.batch_bytes));
    report("loki.timeout".into(), positive(loki.timeout.0));
    report("loki.minBackoff".into(), positive(loki.min_backoff.0));
    if loki.max_backoff < loki.min_backoff {
        report(
            "loki.maxBackoff".into(),
            Err(format!(
                "{} is shorter than minBackoff {}",
                loki.max_backoff, loki.min_backoff
            )),
        );
    }
    for name in loki.external_labels.keys() {
        report(format!("loki.externalLabels.{name}"), stream_label(name));
    }
    report(
        "limits.maxLineBytes".into(),
        at_least_one(config.limits.max_line_bytes),
    );
    report(
        "limits.maxBufferedBytes".into(),
        at_least_one(config.limits.max_buffered_bytes),
    );
    for (index, rule) in config.relabel.iter().enumerate() {
        if let Err(relabel::RelabelError::Invalid {
            index,
            field,
            message,
        }) = relabel::check_rule(index, rule)
        {
            report(format!("relabel[{index}].{field}"), Err(message));
        }
    }
    for (index, stage) in config.pipeline.iter().enumerate() {
        let field = match stage.kind() {
            Ok(kind) => format!("pipeline[{index}].{kind}"),
            Err(_) => format!("pipeline[{index}]"),
        };
        report(field, self::stage(index, stage));
    }
    for (field, message) in crate::selector::problems(&config.selector) {
        report(format!("selector.{field}"), Err(message));
    }
    problems
}

/// A regex of a pipeline stage, compiled as the agent runs it (unanchored).
pub fn stage_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| regex_error(pattern, &e))
}

/// On one line (a status condition's message): the regex crate draws a caret diagram
/// over several.
pub(crate) fn regex_error(pattern: &str, error: &regex::Error) -> String {
    let text = error.to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    format!("invalid regex {pattern:?}: {}", words.join(" "))
}

/// One pipeline stage at position `index`.
pub fn stage(index: usize, stage: &Stage) -> Result<(), String> {
    stage.kind()?;
    if stage.cri.is_some() || stage.docker.is_some() {
        if index != 0 {
            return Err("a parser stage must be the first stage".into());
        }
    } else if let Some(ts) = &stage.timestamp {
        TimeFormat::new(&ts.format)?;
        for fallback in ts.fallback_formats.iter().flatten() {
            TimeFormat::new(fallback)?;
        }
    } else if let Some(names) = stage.label_drop.as_ref().or(stage.label_keep.as_ref()) {
        names.iter().try_for_each(|name| label_name(name))?;
    } else if let Some(labels) = &stage.static_labels {
        labels.keys().try_for_each(|name| stream_label(name))?;
    } else if let Some(json) = &stage.json {
        if json.expressions.is_empty() {
            return Err("expressions must not be empty".into());
        }
    } else if let Some(regex) = &stage.regex {
        let compiled = stage_regex(&regex.expression)?;
        if compiled.capture_names().flatten().next().is_none() {
            return Err(format!(
                "regex {:?} has no named capture group",
                regex.expression
            ));
        }
    } else if let Some(labels) = &stage.labels {
        labels.keys().try_for_each(|name| stream_label(name))?;
    } else if let Some(metadata) = &stage.structured_metadata {
        if metadata.keys().any(String::is_empty) {
            return Err("a structured metadata name must not be empty".into());
        }
    } else if let Some(drop) = &stage.drop {
        if drop.source.is_none()
            && drop.expression.is_none()
            && drop.older_than.is_none()
            && drop.longer_than.is_none()
        {
            return Err("set at least one of source, expression, olderThan, longerThan".into());
        }
        drop.expression.as_deref().map(stage_regex).transpose()?;
    } else if let Some(multiline) = &stage.multiline {
        if multiline.max_lines == 0 {
            return Err("maxLines must be at least 1".into());
        }
        stage_regex(&multiline.first_line)?;
    } else if let Some(limit) = &stage.limit {
        rate_limit(limit)?;
    }
    Ok(())
}

fn rate_limit(limit: &LimitStage) -> Result<(), String> {
    if !(limit.rate.is_finite() && limit.rate > 0.0) {
        return Err(format!("rate must be above 0, got {}", limit.rate));
    }
    if limit.burst == 0 {
        return Err("burst must be at least 1".into());
    }
    if let Some(names) = &limit.by_labels {
        if names.is_empty() {
            return Err("byLabels must name at least one label (or be left out)".into());
        }
        names.iter().try_for_each(|name| label_name(name))?;
    }
    if limit.max_keys == 0 {
        return Err("maxKeys must be at least 1".into());
    }
    Ok(())
}

/// A label name Loki accepts.
pub fn label_name(name: &str) -> Result<(), String> {
    if is_valid_label_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid label name: use letters, digits and _, not starting with a digit (Loki refuses the stream otherwise)"
        ))
    }
}

/// A label this config adds to every stream: a valid name, not a reserved `__` one.
pub fn stream_label(name: &str) -> Result<(), String> {
    label_name(name)?;
    if name.starts_with("__") {
        return Err(format!(
            "{name:?} starts with __, which is reserved for internal labels"
        ));
    }
    Ok(())
}

/// Loki's tenant ID rules (the `X-Scope-OrgID` header).
pub fn tenant(tenant: &str) -> Result<(), String> {
    const ALLOWED: &str = "!-_.*'()";
    if tenant.is_empty() {
        return Err("must not be empty".into());
    }
    if tenant.len() > 150 {
        return Err(format!("{} bytes, at most 150", tenant.len()));
    }
    if tenant == "." || tenant == ".." {
        return Err(format!("{tenant:?} is not a valid tenant ID"));
    }
    if let Some(bad) = tenant
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ALLOWED.contains(*c)))
    {
        return Err(format!(
            "{bad:?} is not allowed in a tenant ID: use letters, digits and {ALLOWED}"
        ));
    }
    Ok(())
}

/// One source, named as Kubernetes names label and annotation keys (or a field name).
pub fn tenant_from(from: &TenantFrom) -> Result<(), String> {
    match from.source()? {
        TenantSource::NamespaceLabel(key)
        | TenantSource::PodLabel(key)
        | TenantSource::PodAnnotation(key) => crate::selector::label_key(key),
        TenantSource::Field("") => Err("field must not be empty".into()),
        TenantSource::Field(_) => Ok(()),
    }
}

/// An `http://` or `https://` URL with a host.
pub fn push_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(format!("{url:?} contains whitespace"));
    }
    Ok(())
}

fn at_least_one(value: u64) -> Result<(), String> {
    if value == 0 {
        Err("must be at least 1".into())
    } else {
        Ok(())
    }
}

fn positive(value: std::time::Duration) -> Result<(), String> {
    if value.is_zero() {
        Err("must be longer than 0s".into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
