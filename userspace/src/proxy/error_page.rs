//! GoRouter's `html_error_template_file`: the gateway's own answers (404 for an unknown route,
//! 502, 503 …) as an HTML page of the operator's, for callers that ask for HTML. GoRouter's
//! templates are Go templates over `.Status`, `.StatusText`, `.Message` and `.Header`; this takes
//! those four (`{{.Header.Get "Name"}}` for a header of the answer, `X-Cf-Routererror` say),
//! with Go's `{{-`/`-}}` trimming and `{{/* comments */}}`, and refuses anything else by line,
//! so that a template which would render differently here is found at `check`, not by a caller.

use http::header::{HeaderMap, HeaderName, ACCEPT};
use http::StatusCode;

/// A parsed template.
#[derive(Debug, PartialEq, Eq)]
pub struct ErrorTemplate {
    pieces: Vec<Piece>,
}

#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Status,
    StatusText,
    Message,
    Header(HeaderName),
}

const SUPPORTED: &str = "the template may use {{.Status}}, {{.StatusText}}, {{.Message}} and \
                         {{.Header.Get \"Name\"}}, GoRouter's fields, without conditionals or pipelines";

impl ErrorTemplate {
    /// Parses `src`; the error names the line of the first action it cannot render.
    pub fn parse(src: &str) -> Result<ErrorTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = src;
        // Go's `-}}`: the text after the action loses its leading white space.
        let mut trim_next = false;
        while let Some(open) = rest.find("{{") {
            let line = src[..src.len() - rest.len() + open].matches('\n').count() + 1;
            let mut text = &rest[..open];
            if trim_next {
                text = text.trim_start();
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("line {line}: '{{{{' is never closed"))?;
            let mut action = &after[..close];
            if let Some(a) = action.strip_prefix("- ") {
                text = text.trim_end();
                action = a;
            }
            trim_next = false;
            if let Some(a) = action.strip_suffix(" -") {
                trim_next = true;
                action = a;
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(text.to_string()));
            }
            rest = &after[close + 2..];
            let action = action.trim();
            if action.starts_with("/*") && action.ends_with("*/") {
                continue;
            }
            let piece = match action {
                ".Status" => Piece::Status,
                ".StatusText" => Piece::StatusText,
                ".Message" => Piece::Message,
                _ => match header_name(action) {
                    Some(name) => Piece::Header(
                        HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| format!("line {line}: '{name}' is not a header name"))?,
                    ),
                    None => {
                        return Err(format!(
                            "line {line}: '{{{{{action}}}}}' is not supported: {SUPPORTED}"
                        ))
                    }
                },
            };
            pieces.push(piece);
        }
        let text = if trim_next { rest.trim_start() } else { rest };
        if !text.is_empty() {
            pieces.push(Piece::Text(text.to_string()));
        }
        Ok(ErrorTemplate { pieces })
    }

    /// The page for an answer of `status` whose plain body is `message`, with `headers` (the
    /// answer's, as `.Header`). Values from the request (a host name in `message`, say) are
    /// escaped for HTML.
    pub fn render(&self, status: StatusCode, message: &str, headers: &HeaderMap) -> String {
        let mut out = String::with_capacity(1024);
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Status => out.push_str(status.as_str()),
                Piece::StatusText => out.push_str(status.canonical_reason().unwrap_or("")),
                Piece::Message => escape(&mut out, message),
                Piece::Header(name) => {
                    if let Some(v) = headers.get(name) {
                        escape(&mut out, &String::from_utf8_lossy(v.as_bytes()));
                    }
                }
            }
        }
        out
    }
}

/// The name in `.Header.Get "Name"` (or with a raw string's backquotes).
fn header_name(action: &str) -> Option<&str> {
    let arg = action.strip_prefix(".Header.Get")?.trim();
    arg.strip_prefix('"')
        .and_then(|a| a.strip_suffix('"'))
        .or_else(|| arg.strip_prefix('`').and_then(|a| a.strip_suffix('`')))
        .filter(|n| !n.contains(['"', '`']))
}

/// Appends `s` with HTML's special characters escaped (text and quoted attribute values alike).
fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// Whether the request's `Accept` names `text/html` (with a weight above zero): a browser's
/// does; an API client's, curl's `*/*` and no `Accept` at all do not, and keep the plain answer.
pub fn accepts_html(h: &HeaderMap) -> bool {
    h.get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                let q = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="));
                q.and_then(|q| q.trim().parse::<f32>().ok()) == Some(0.0)
            });
            media.eq_ignore_ascii_case("text/html") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn renders_gorouters_fields_and_escapes_what_came_from_the_request() {
        let t = ErrorTemplate::parse(
            "<h1>{{.Status}} {{ .StatusText }}</h1>\n<p>{{.Message}}</p>\
             <!-- {{.Header.Get \"X-Cf-Routererror\"}} {{.Header.Get `X-Absent`}} -->",
        )
        .unwrap();
        let page = t.render(
            StatusCode::NOT_FOUND,
            "Requested route ('<script>a&b\"'</script>') does not exist.",
            &headers(&[("x-cf-routererror", "unknown_route")]),
        );
        assert_eq!(
            page,
            "<h1>404 Not Found</h1>\n<p>Requested route (&#39;&lt;script&gt;a&amp;b&#34;&#39;\
             &lt;/script&gt;&#39;) does not exist.</p><!-- unknown_route  -->"
        );
    }

    #[test]
    fn trims_as_go_does_and_drops_comments() {
        let t =
            ErrorTemplate::parse("a  \n {{- .Status -}} \n  b{{/* note */}}c {{- /* x */ -}}  ")
                .unwrap();
        assert_eq!(
            t.render(StatusCode::BAD_GATEWAY, "", &HeaderMap::new()),
            "a502bc"
        );
        let plain = ErrorTemplate::parse("no actions at all").unwrap();
        assert_eq!(
            plain.render(StatusCode::OK, "m", &HeaderMap::new()),
            "no actions at all"
        );
    }

    #[test]
    fn refuses_what_it_cannot_render_by_line() {
        for (src, want) in [
            (
                "ok\n{{if .Message}}x{{end}}",
                "line 2: '{{if .Message}}' is not supported: ",
            ),
            ("{{.Status}}\n\n{{.Status", "line 3: '{{' is never closed"),
            (
                "{{.Header.Get \"Bad Name\"}}",
                "line 1: 'Bad Name' is not a header name",
            ),
            (
                "{{.Header.Get X}}",
                "line 1: '{{.Header.Get X}}' is not supported: ",
            ),
            (
                "{{.Message | html}}",
                "line 1: '{{.Message | html}}' is not supported: ",
            ),
        ] {
            let e = ErrorTemplate::parse(src).unwrap_err();
            assert!(e.starts_with(want), "{src:?}: {e}");
        }
    }

    #[test]
    fn html_is_for_callers_that_ask_for_it() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(accepts_html(&headers(&[("accept", browser)])));
        assert!(accepts_html(&headers(&[
            ("accept", "application/json"),
            ("accept", "Text/HTML; charset=utf-8")
        ])));
        for no in [
            "*/*",
            "application/json",
            "text/html;q=0",
            "text/html; q=0.0, text/plain",
        ] {
            assert!(!accepts_html(&headers(&[("accept", no)])), "{no}");
        }
        assert!(!accepts_html(&HeaderMap::new()));
    }
}
