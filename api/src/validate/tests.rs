use super::*;

const BASE: &str = "loki: {url: 'http://loki:3100/loki/api/v1/push', tenant: ops}\n";

fn problems(extra: &str) -> Vec<Problem> {
    let text = format!("{BASE}{extra}");
    let config: AgentConfig = serde_yaml::from_str(&text).expect("parses");
    config_problems(&config)
}

fn config_problems(config: &AgentConfig) -> Vec<Problem> {
    super::config(config)
}

#[test]
fn a_good_config_has_no_problem() {
    let found = problems(
        "relabel:\n- {sourceLabels: [__meta_kubernetes_namespace], targetLabel: namespace}\n\
         pipeline:\n- cri: {}\n- timestamp: {source: time, format: RFC3339}\n\
         - regex: {expression: '^(?P<level>\\w+)'}\n- labels: {level: ''}\n\
         - multiline: {firstLine: '^\\S'}\n- limit: {rate: 10, burst: 20}\n\
         - limit: {rate: 10, burst: 20, byLabels: [namespace, app], maxKeys: 50}\n\
         selector: {namespaceSelector: {matchLabels: {team: shop}}, podSelector: {matchExpressions: [{key: app, operator: Exists}]}}\n",
    );
    assert_eq!(found, []);
}

/// Each bad document, the field it must be reported at, and a word of the reason.
#[test]
fn every_mistake_is_named_by_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "pipeline:\n- staticLabels: {my-team: a}\n",
            "pipeline[0].staticLabels",
            "not a valid label name",
        ),
        (
            "pipeline:\n- staticLabels: {1team: a}\n",
            "pipeline[0].staticLabels",
            "not a valid label name",
        ),
        (
            "pipeline:\n- staticLabels: {__team: a}\n",
            "pipeline[0].staticLabels",
            "reserved",
        ),
        (
            "pipeline:\n- labels: {level-name: level}\n",
            "pipeline[0].labels",
            "not a valid label name",
        ),
        (
            "pipeline:\n- labelDrop: [file-name]\n",
            "pipeline[0].labelDrop",
            "not a valid label name",
        ),
        (
            "relabel:\n- {sourceLabels: [a], targetLabel: pod-name}\n",
            "relabel[0].targetLabel",
            "not a valid label name",
        ),
        (
            "relabel:\n- {sourceLabels: [a], action: hashmod, targetLabel: shard}\n",
            "relabel[0].modulus",
            "modulus",
        ),
        (
            "relabel:\n- {sourceLabels: [a], action: replace}\n",
            "relabel[0].targetLabel",
            "requires a target label",
        ),
        (
            "relabel:\n- {sourceLabels: [a], regex: '(', targetLabel: b}\n",
            "relabel[0].regex",
            "invalid regex",
        ),
        (
            "relabel:\n- {action: labeldrop, regex: x, targetLabel: y}\n",
            "relabel[0].action",
            "takes only a regex",
        ),
        (
            "pipeline:\n- regex: {expression: '(?P<level>'}\n",
            "pipeline[0].regex",
            "invalid regex",
        ),
        (
            "pipeline:\n- regex: {expression: '\\w+'}\n",
            "pipeline[0].regex",
            "no named capture group",
        ),
        (
            "pipeline:\n- drop: {expression: '['}\n",
            "pipeline[0].drop",
            "invalid regex",
        ),
        (
            "pipeline:\n- drop: {}\n",
            "pipeline[0].drop",
            "at least one",
        ),
        (
            "pipeline:\n- multiline: {firstLine: '^\\S', maxLines: 0}\n",
            "pipeline[0].multiline",
            "maxLines",
        ),
        (
            "pipeline:\n- multiline: {firstLine: '*'}\n",
            "pipeline[0].multiline",
            "invalid regex",
        ),
        (
            "pipeline:\n- limit: {rate: -1, burst: 5}\n",
            "pipeline[0].limit",
            "rate",
        ),
        (
            "pipeline:\n- limit: {rate: 5, burst: 0}\n",
            "pipeline[0].limit",
            "burst",
        ),
        (
            "pipeline:\n- timestamp: {source: time, format: '%Q'}\n",
            "pipeline[0].timestamp",
            "strftime",
        ),
        (
            "pipeline:\n- json: {expressions: {}}\n",
            "pipeline[0].json",
            "must not be empty",
        ),
        (
            "pipeline:\n- timestamp: {source: time, format: RFC3339}\n- cri: {}\n",
            "pipeline[1].cri",
            "first stage",
        ),
        ("pipeline:\n- {}\n", "pipeline[0]", "exactly one kind"),
        (
            "pipeline:\n- structuredMetadata: {'': trace}\n",
            "pipeline[0].structuredMetadata",
            "must not be empty",
        ),
        (
            "pipeline:\n- limit: {rate: 5, burst: 5, byLabels: [app-name]}\n",
            "pipeline[0].limit",
            "not a valid label name",
        ),
        (
            "pipeline:\n- limit: {rate: 5, burst: 5, byLabels: []}\n",
            "pipeline[0].limit",
            "at least one label",
        ),
        (
            "pipeline:\n- limit: {rate: 5, burst: 5, byLabels: [app], maxKeys: 0}\n",
            "pipeline[0].limit",
            "maxKeys",
        ),
        (
            "selector: {podSelector: {matchExpressions: [{key: app, operator: In}]}}\n",
            "selector.podSelector.matchExpressions[0]",
            "needs values",
        ),
        (
            "selector: {namespaceSelector: {matchLabels: {team: 'a b'}}}\n",
            "selector.namespaceSelector.matchLabels.team",
            "not a label value",
        ),
        (
            "limits: {maxLineBytes: 0}\n",
            "limits.maxLineBytes",
            "at least 1",
        ),
        (
            "limits: {maxBufferedBytes: 0}\n",
            "limits.maxBufferedBytes",
            "at least 1",
        ),
    ];
    for (extra, field, reason) in cases {
        let found = problems(extra);
        assert!(
            found
                .iter()
                .any(|p| p.field == *field && p.message.contains(reason)),
            "{extra:?}: expected {field}: ...{reason}..., found {found:?}"
        );
    }
}

#[test]
fn the_push_client_is_checked() {
    let cases: &[(&str, &str, &str)] = &[
        ("loki: {url: 'ftp://x', tenant: a}", "loki.url", "http://"),
        (
            "loki: {url: 'http:///push', tenant: a}",
            "loki.url",
            "no host",
        ),
        (
            "loki: {url: 'http://x', tenant: ''}",
            "loki.tenant",
            "empty",
        ),
        (
            "loki: {url: 'http://x', tenant: 'a|b'}",
            "loki.tenant",
            "'|'",
        ),
        (
            "loki: {url: 'http://x', tenant: '..'}",
            "loki.tenant",
            "not a valid tenant",
        ),
        (
            "loki: {url: 'http://x', tenant: a, batchBytes: 0}",
            "loki.batchBytes",
            "at least 1",
        ),
        (
            "loki: {url: 'http://x', tenant: a, timeout: 0s}",
            "loki.timeout",
            "longer than 0s",
        ),
        (
            "loki: {url: 'http://x', tenant: a, minBackoff: 5s, maxBackoff: 1s}",
            "loki.maxBackoff",
            "shorter",
        ),
        (
            "loki: {url: 'http://x', tenant: a, externalLabels: {cluster-name: a}}",
            "loki.externalLabels.cluster-name",
            "label name",
        ),
        (
            "loki: {url: 'http://x', tenant: a, tenantFrom: {}}",
            "loki.tenantFrom",
            "set one of",
        ),
        (
            "loki: {url: 'http://x', tenant: a, tenantFrom: {podLabel: team, field: t}}",
            "loki.tenantFrom",
            "only one",
        ),
        (
            "loki: {url: 'http://x', tenant: a, tenantFrom: {namespaceLabel: 'team tenant'}}",
            "loki.tenantFrom",
            "not a label key",
        ),
        (
            "loki: {url: 'http://x', tenant: a, tenantFrom: {podAnnotation: '/tenant'}}",
            "loki.tenantFrom",
            "not a label key",
        ),
        (
            "loki: {url: 'http://x', tenant: a, tenantFrom: {field: ''}}",
            "loki.tenantFrom",
            "must not be empty",
        ),
    ];
    for (text, field, reason) in cases {
        let config: AgentConfig = serde_yaml::from_str(text).expect("parses");
        let found = config_problems(&config);
        assert!(
            found
                .iter()
                .any(|p| p.field == *field && p.message.contains(reason)),
            "{text:?}: expected {field}: ...{reason}..., found {found:?}"
        );
    }
}

#[test]
fn each_tenant_source_alone_is_accepted() {
    for from in [
        "{namespaceLabel: logpipe.io/tenant}",
        "{podLabel: team}",
        "{podAnnotation: logpipe.io/tenant}",
        "{field: tenant}",
    ] {
        let text = format!("loki: {{url: 'http://x', tenant: a, tenantFrom: {from}}}");
        let config: AgentConfig = serde_yaml::from_str(&text).expect("parses");
        assert_eq!(config_problems(&config), [], "{from}");
    }
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let found = problems(
        "relabel:\n- {sourceLabels: [a], targetLabel: pod-name}\n\
         pipeline:\n- regex: {expression: '('}\n- limit: {rate: 0, burst: 0}\n",
    );
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "relabel[0].targetLabel",
            "pipeline[0].regex",
            "pipeline[1].limit"
        ]
    );
}

#[test]
fn the_agent_loader_refuses_what_validation_finds() {
    let err = AgentConfig::from_yaml(&format!("{BASE}pipeline:\n- regex: {{expression: '('}}\n"))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("pipeline[0].regex: invalid regex"), "{err}");
}
