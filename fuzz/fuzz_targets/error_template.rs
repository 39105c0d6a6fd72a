//! Any text as an `html_error_template_file`: parsing never panics, and a page rendered from a
//! template that parsed never carries markup from the request's text (a host name in the
//! message, a header value), whatever the template.
#![no_main]

use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::ErrorTemplate;

/// Text a caller controls, with every character HTML escapes.
const HOSTILE: &str = "<script>\"'&x</script>";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = ErrorTemplate::parse(text) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("x-cf-routererror", HeaderValue::from_static(HOSTILE));
    let page = template.render(StatusCode::NOT_FOUND, HOSTILE, &headers);
    let bare = template.render(StatusCode::NOT_FOUND, "", &HeaderMap::new());
    // Every bracket of the page is one of the template's own.
    for c in ['<', '>'] {
        let count = |s: &str| s.matches(c).count();
        assert_eq!(count(&page), count(&bare), "unescaped {c}: {page}");
    }
});
