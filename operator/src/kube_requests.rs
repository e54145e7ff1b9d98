//! Counts the requests the operator's kube client sends to the API server, by verb and
//! resource (`logpipe_operator_kube_requests_total`), with a tower layer on the client.
//!
//! The layer sits outside kube's own stack, so a request is counted once as the operator
//! issued it (a long-lived watch counts once per connection). Labels are bounded: the verb
//! is one of Kubernetes' verbs, the resource one the operator's code names (e.g. `pods`,
//! `logpipelines/status`); a path that names no resource is `non-resource`.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request};
use kube::client::ClientBuilder;

use crate::metrics::Metrics;

/// Kubernetes' verb and resource (with `/subresource`) of one request.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> (&'static str, String) {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    // namespaces/<ns>/<resource>/... is namespaced; namespaces[/<name>] is the resource.
    let rest = match rest {
        ["namespaces", _ns, inner @ ..] if !inner.is_empty() => inner,
        other => other,
    };
    let (resource, named) = match rest {
        [] => {
            let verb = if *method == Method::GET {
                "get"
            } else {
                "other"
            };
            return (verb, "non-resource".to_string());
        }
        [resource] => ((*resource).to_string(), false),
        [resource, _name] => ((*resource).to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watch = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    });
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// The tower layer: counts each request in `metrics`, then passes it on unchanged.
#[derive(Clone, Debug)]
pub struct CountLayer {
    metrics: Arc<Metrics>,
}

impl CountLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for CountLayer {
    type Service = CountService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CountService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower_service::Service<Request<B>> for CountService<S>
where
    S: tower_service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (verb, resource) = classify(
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        self.metrics.kube_request(verb, resource);
        self.inner.call(request)
    }
}

/// A kube client from `config` whose requests are counted in `metrics`.
pub fn counted_client(config: kube::Config, metrics: Arc<Metrics>) -> kube::Result<kube::Client> {
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&CountLayer::new(metrics))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, uri: &str) -> (&'static str, String) {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        classify(&method, path, query)
    }

    #[test]
    fn verbs_and_resources_of_the_operator_requests() {
        let cases = [
            (
                Method::GET,
                "/api/v1/namespaces/ns/pods?labelSelector=a%3Db",
                ("list", "pods"),
            ),
            (Method::GET, "/api/v1/pods", ("list", "pods")),
            (
                Method::GET,
                "/api/v1/namespaces/ns/pods?watch=true&resourceVersion=5",
                ("watch", "pods"),
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/ns/daemonsets/logpipe-agent",
                ("get", "daemonsets"),
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/ns/daemonsets/a?fieldManager=m&force=true",
                ("patch", "daemonsets"),
            ),
            (
                Method::PATCH,
                "/apis/logpipe.io/v1alpha1/namespaces/ns/logpipelines/lp/status",
                ("patch", "logpipelines/status"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/pods/p-1",
                ("delete", "pods"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/configmaps",
                ("deletecollection", "configmaps"),
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                ("create", "events"),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                ("update", "leases"),
            ),
            (
                Method::GET,
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/x",
                ("get", "clusterroles"),
            ),
            (Method::GET, "/api/v1/namespaces/ns", ("get", "namespaces")),
            (Method::GET, "/api/v1/namespaces", ("list", "namespaces")),
            (
                Method::GET,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com",
                ("get", "customresourcedefinitions"),
            ),
            (Method::GET, "/version", ("get", "non-resource")),
            (Method::GET, "/apis", ("get", "non-resource")),
            (Method::GET, "/apis/apps/v1", ("get", "non-resource")),
        ];
        for (method, uri, (verb, resource)) in cases {
            assert_eq!(c(method, uri), (verb, resource.to_string()), "{uri}");
        }
    }

    #[test]
    fn a_watch_needs_the_watch_parameter_itself() {
        assert_eq!(
            c(Method::GET, "/api/v1/pods?allowWatchBookmarks=true").0,
            "list"
        );
        assert_eq!(c(Method::GET, "/api/v1/pods?watch=1").0, "watch");
    }
}
