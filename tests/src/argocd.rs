//! Runs the LogPipeline health check the chart ships for ArgoCD
//! (`charts/logpipe/argocd/health.lua`) on a real object, with a Lua 5.1 interpreter: the
//! Lua version ArgoCD embeds (gopher-lua). The object is handed over as a Lua table
//! literal, as ArgoCD hands it over as `obj`.

use std::process::Command;

use serde_json::Value;

/// ArgoCD's verdict: (`Healthy` | `Progressing` | `Degraded` | `Suspended`, message), or
/// why the script could not be run.
pub fn health(object: &Value) -> Result<(String, String), String> {
    let script = crate::repo_root().join("charts/logpipe/argocd/health.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({:?})\nio.write(hs.status, \"\\t\", hs.message or \"\")\n",
        lua_literal(object),
        script.display().to_string()
    );
    let output = Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .map_err(|e| {
            format!(
                "lua5.1 is needed to test the ArgoCD health check ({e}): apt-get install lua5.1"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "health.lua failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    Ok((status.to_string(), message.to_string()))
}

fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua_literal).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\{}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
