//! A destination of a test: its mock path and the router's settings.

/// One destination of a test: its name, the mock path it posts to, and
/// the router's settings for it.
#[derive(Debug, Clone)]
pub struct TestDestination {
    pub path: String,
    /// The router's settings; its `url` is made from `path` when the
    /// system starts (the mock's address is not known before).
    pub settings: router::config::DestinationConfig,
}

impl TestDestination {
    /// A destination with fast retries (10 ms doubling, 5 attempts), a 2 s
    /// attempt timeout, and the circuit breaker at its defaults, as users
    /// get it. A test that needs it off says why ([`Self::without_breaker`]).
    pub fn new(name: &str, path: &str) -> Self {
        Self {
            path: path.into(),
            settings: router::config::DestinationConfig {
                name: name.into(),
                url: String::new(),
                timeout_ms: 2000,
                max_concurrency: 64,
                headers: Default::default(),
                max_age_ms: None,
                retry: router::config::RetryConfig {
                    initial_delay_ms: 10,
                    max_delay_ms: 1000,
                    max_attempts: Some(5),
                    ..Default::default()
                },
                signing_secrets: Vec::new(),
                event_types: Vec::new(),
                breaker: Default::default(),
                rate_limit_per_sec: None,
            },
        }
    }

    pub fn event_types(mut self, event_types: &[&str]) -> Self {
        self.settings.event_types = event_types.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn signed_with(mut self, secrets: &[&str]) -> Self {
        self.settings.signing_secrets = secrets
            .iter()
            .map(|secret| secret.to_string().try_into().expect("a valid test secret"))
            .collect();
        self
    }

    pub fn max_age_ms(mut self, max_age_ms: u64) -> Self {
        self.settings.max_age_ms = Some(max_age_ms);
        self
    }

    pub fn retry(mut self, initial_delay_ms: u64, max_delay_ms: u64, max_attempts: u32) -> Self {
        self.settings.retry = router::config::RetryConfig {
            initial_delay_ms,
            max_delay_ms,
            max_attempts: Some(max_attempts),
            ..Default::default()
        };
        self
    }

    /// Retries with no attempt limit, until `max_elapsed_ms` after the first attempt.
    pub fn retry_for(
        mut self,
        initial_delay_ms: u64,
        max_delay_ms: u64,
        max_elapsed_ms: u64,
    ) -> Self {
        self.settings.retry = router::config::RetryConfig {
            initial_delay_ms,
            max_delay_ms,
            max_attempts: None,
            max_elapsed_ms,
        };
        self
    }

    /// The retry policy a destination gets when its config names none
    /// (100 ms doubling to 5 min, for up to 24 h).
    pub fn default_retry(mut self) -> Self {
        self.settings.retry = Default::default();
        self
    }

    pub fn breaker(mut self, breaker: router::config::BreakerConfig) -> Self {
        self.settings.breaker = breaker;
        self
    }

    /// Turns the circuit breaker off: for a test that counts every attempt
    /// against a destination failing them all (with the breaker, its circuit
    /// would open and its events would wait instead).
    pub fn without_breaker(mut self) -> Self {
        self.settings.breaker.enabled = false;
        self
    }

    pub fn rate_limit_per_sec(mut self, rate: u32) -> Self {
        self.settings.rate_limit_per_sec = Some(rate);
        self
    }

    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.settings.timeout_ms = timeout_ms;
        self
    }

    pub fn max_concurrency(mut self, max_concurrency: usize) -> Self {
        self.settings.max_concurrency = max_concurrency;
        self
    }
}

/// Three destinations taking everything: fast, slow, and one failing 30%
/// of attempts (retried until it succeeds); and one taking only the load's
/// `load.a` events, which reads references the routing stage writes
/// (decision 0004), so every fault hits that path too.
pub fn fault_destinations() -> Vec<TestDestination> {
    vec![
        TestDestination::new("fast", "/ok/fast"),
        TestDestination::new("slow", "/slow/5/slow"),
        TestDestination::new("flaky", "/random/30/flaky").retry(5, 50, 50),
        TestDestination::new("typed", "/ok/typed").event_types(&["load.a"]),
    ]
}
