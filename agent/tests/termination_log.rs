//! The agent's last words: a fatal error reaches the termination-message file.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_logpipe-agent"))
}

#[test]
fn a_regex_that_does_not_compile_is_the_termination_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "loki: {url: 'http://127.0.0.1:9/loki/api/v1/push', tenant: t}\n\
         pipeline:\n- cri: {}\n- regex: {expression: 'level=(?P<level>[a-z'}\n",
    )
    .unwrap();
    let last_words = dir.path().join("termination-log");
    let output = agent()
        .arg("--config")
        .arg(&config)
        .arg("--node-name=n1")
        .arg(format!(
            "--positions={}",
            dir.path().join("p.json").display()
        ))
        .arg("--termination-log")
        .arg(&last_words)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = std::fs::read_to_string(&last_words).unwrap();
    assert!(
        message.starts_with("invalid config: pipeline[1].regex: invalid regex"),
        "{message:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&message), "{stderr}");
}

#[test]
fn a_config_that_does_not_load_is_the_termination_message_and_empty_disables_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.yaml");
    let last_words = dir.path().join("termination-log");
    let status = agent()
        .arg("--config")
        .arg(&missing)
        .arg("--termination-log")
        .arg(&last_words)
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
    let message = std::fs::read_to_string(&last_words).unwrap();
    assert!(message.contains("absent.yaml"), "{message:?}");

    std::fs::remove_file(&last_words).unwrap();
    let status = agent()
        .arg("--config")
        .arg(&missing)
        .arg("--termination-log=")
        .current_dir(dir.path())
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written"
    );
}
