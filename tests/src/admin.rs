//! Talking to the router's admin listener and reading Prometheus text.

use serde_json::Value;

use crate::{TestSystem, ADMIN_TOKEN};

impl TestSystem {
    fn admin(&self, path: &str) -> String {
        let base = self
            .admin_url
            .as_deref()
            .expect("a router's admin listener is known");
        format!("{base}{path}")
    }

    /// GETs an admin path, insisting on 200; returns the JSON body.
    pub async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.admin(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin answers");
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("JSON body")
    }

    /// Sends `method` to an admin path with an optional JSON body; returns
    /// the status and the JSON body (null when empty).
    pub async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, self.admin(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("admin answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The admin view of one destination, or `None` while the router's
    /// admin listener does not answer (a child router still starting).
    pub async fn try_destination_view(&self, name: &str) -> Option<Value> {
        let response = self
            .http
            .get(self.admin("/admin/destinations"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        let overview: Value = response.json().await.ok()?;
        overview["destinations"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
    }

    /// The admin view of one destination.
    pub async fn destination_view(&self, name: &str) -> Value {
        let overview = self.admin_get("/admin/destinations").await;
        overview["destinations"]
            .as_array()
            .expect("destinations array")
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no destination {name} in {overview}"))
    }

    /// The router's Prometheus metrics.
    pub async fn router_metrics(&self) -> Metrics {
        self.metrics_at(self.admin("/metrics")).await
    }

    /// The gateway's Prometheus metrics.
    pub async fn gateway_metrics(&self) -> Metrics {
        self.metrics_at(format!("{}/metrics", self.gateway_url))
            .await
    }

    async fn metrics_at(&self, url: String) -> Metrics {
        // The gateway's metrics are open; the router's need the admin token.
        let response = self
            .http
            .get(url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("metrics answer");
        Metrics(response.text().await.expect("text"))
    }
}

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The sample of `name` whose labels include all of `labels`, summed
    /// over the other labels; 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, label_text) = match series.split_once('{') {
                    Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let matches = metric == name
                    && labels
                        .iter()
                        .all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\"")));
                matches.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let metrics = Metrics(
            "# TYPE x counter\nx{destination=\"a\",outcome=\"ok\"} 3\nx{destination=\"b\",outcome=\"ok\"} 4\nx_sum 9\ny 1.5\n"
                .into(),
        );
        assert_eq!(metrics.value("x", &[("destination", "a")]), 3.0);
        assert_eq!(metrics.value("x", &[("outcome", "ok")]), 7.0);
        assert_eq!(metrics.value("y", &[]), 1.5);
        assert_eq!(metrics.value("x", &[("destination", "c")]), 0.0);
    }
}
