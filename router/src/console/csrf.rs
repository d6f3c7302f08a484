//! The console's forms carry a token that must match a cookie the console
//! set (the double-submit pattern): a page of another site can make the
//! browser send the cookie, but cannot read it to put it in the form. The
//! cookie is `SameSite=Strict` and `HttpOnly`, so it is not even sent with
//! such a request. This backs up the listener's check of `Origin` and
//! `Sec-Fetch-Site`, which browsers too old to send them would miss.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::HttpRequest;

/// The cookie's name.
pub const COOKIE: &str = "evd_console_csrf";

/// The request's token, if its cookie holds a well-formed one.
pub fn token_of(request: &HttpRequest) -> Option<String> {
    let token = request.cookie(COOKIE)?.value().to_owned();
    (token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit())).then_some(token)
}

/// A new random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cookie that carries `token`.
pub fn cookie(token: &str) -> Cookie<'static> {
    Cookie::build(COOKIE, token.to_owned())
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish()
}

/// Whether a form's `submitted` token matches the request's cookie.
pub fn matches(request: &HttpRequest, submitted: Option<&str>) -> bool {
    match (token_of(request), submitted) {
        (Some(expected), Some(submitted)) => constant_time_eq(&expected, submitted),
        _ => false,
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn a_form_passes_only_with_its_cookies_token() {
        let token = new_token();
        let request = TestRequest::default()
            .cookie(cookie(&token))
            .to_http_request();
        assert!(matches(&request, Some(&token)));
        assert!(!matches(&request, Some(&new_token())));
        assert!(!matches(&request, None));
        let without = TestRequest::default().to_http_request();
        assert!(!matches(&without, Some(&token)));
    }
}
