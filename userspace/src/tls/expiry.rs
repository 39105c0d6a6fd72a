//! Certificate expiry: every certificate the config loaded (server chains, the domains' identity
//! CAs, the backend CA and client certificate) is exported as a gauge of its `notAfter`, and one
//! that has expired, is not valid yet or expires within [`SOON`] is said in the log at start, on
//! reload and once a day, and by `portcullis check`.
//!
//! An expired certificate is not refused: the gateway starts and serves as a rival would, since
//! refusing to start turns a certificate problem into an outage of every route.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::CertValidity;
use crate::metrics::{CertLabels, Metrics};

/// How early an approaching expiry is said.
pub const SOON: Duration = Duration::from_secs(30 * 86_400);

/// How often a running gateway looks again.
pub const EVERY: Duration = Duration::from_secs(86_400);

/// What is wrong with one certificate's validity at some time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    Expired,
    NotYetValid,
    /// Expires within [`SOON`]; whole days left (0 on the last day).
    ExpiresSoon {
        days: i64,
    },
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificates with something to say about them at `now` (Unix seconds), in config order.
pub fn review(certs: &[CertValidity], now: i64) -> Vec<(&CertValidity, Finding)> {
    let soon = SOON.as_secs() as i64;
    certs
        .iter()
        .filter_map(|c| {
            let finding = if now > c.not_after {
                Finding::Expired
            } else if now < c.not_before {
                Finding::NotYetValid
            } else if c.not_after - now <= soon {
                Finding::ExpiresSoon {
                    days: (c.not_after - now) / 86_400,
                }
            } else {
                return None;
            };
            Some((c, finding))
        })
        .collect()
}

/// A Unix time as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One line for `portcullis check`: the key, the file, the subject and what is wrong, with the date.
pub fn describe(c: &CertValidity, f: Finding) -> String {
    let what = match f {
        Finding::Expired => format!("expired on {}", rfc3339(c.not_after)),
        Finding::NotYetValid => format!("not valid until {}", rfc3339(c.not_before)),
        Finding::ExpiresSoon { days } => {
            format!("expires on {} ({days} days left)", rfc3339(c.not_after))
        }
    };
    format!("{} ('{}', {}): {what}", c.key, c.file, c.subject)
}

/// Says every finding in the log: an error for an expired or not yet valid certificate, a
/// warning for one that expires soon.
pub fn log(certs: &[CertValidity], now: i64) {
    for (c, f) in review(certs, now) {
        let (key, file, subject) = (&c.key, &c.file, &c.subject);
        match f {
            Finding::Expired => tracing::error!(
                key, file, subject, not_after = %rfc3339(c.not_after),
                "certificate has expired"
            ),
            Finding::NotYetValid => tracing::error!(
                key, file, subject, not_before = %rfc3339(c.not_before),
                "certificate is not valid yet"
            ),
            Finding::ExpiresSoon { days } => tracing::warn!(
                key, file, subject, not_after = %rfc3339(c.not_after), days_left = days,
                "certificate expires soon"
            ),
        }
    }
}

/// Replaces the `portcullis_certificate_expiry_timestamp_seconds` series with the config's.
pub fn publish(metrics: &Metrics, certs: &[CertValidity]) {
    metrics.certificate_expiry.clear();
    for c in certs {
        metrics
            .certificate_expiry
            .get_or_create(&CertLabels {
                key: c.key.clone(),
                file: c.file.clone(),
                subject: c.subject.clone(),
            })
            .set(c.not_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn cert(key: &str, not_before: i64, not_after: i64) -> CertValidity {
        CertValidity {
            key: key.into(),
            file: "server.pem".into(),
            subject: "CN=example".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn each_certificate_is_judged_against_now_and_the_warning_window() {
        let now = 1_800_000_000;
        let certs = [
            cert("fine", now - DAY, now + 31 * DAY),
            cert("window_edge", now - DAY, now + 30 * DAY),
            cert("last_day", now - DAY, now + 3_600),
            cert("ends_now", now - DAY, now),
            cert("expired", now - 2 * DAY, now - 1),
            cert("future", now + 1, now + 400 * DAY),
        ];
        let found: Vec<(&str, Finding)> = review(&certs, now)
            .into_iter()
            .map(|(c, f)| (c.key.as_str(), f))
            .collect();
        assert_eq!(
            found,
            [
                ("window_edge", Finding::ExpiresSoon { days: 30 }),
                ("last_day", Finding::ExpiresSoon { days: 0 }),
                ("ends_now", Finding::ExpiresSoon { days: 0 }),
                ("expired", Finding::Expired),
                ("future", Finding::NotYetValid),
            ]
        );
    }

    #[test]
    fn descriptions_name_the_key_file_subject_and_date() {
        let c = cert("tls.certificates[0].cert_chain[0]", 0, 1_767_225_600);
        assert_eq!(
            describe(&c, Finding::Expired),
            "tls.certificates[0].cert_chain[0] ('server.pem', CN=example): expired on \
             2026-01-01T00:00:00Z"
        );
        assert_eq!(
            describe(&c, Finding::ExpiresSoon { days: 3 }),
            "tls.certificates[0].cert_chain[0] ('server.pem', CN=example): expires on \
             2026-01-01T00:00:00Z (3 days left)"
        );
        let c = cert("domains[0].ca_certs[1]", 1_767_225_600, 1_900_000_000);
        assert_eq!(
            describe(&c, Finding::NotYetValid),
            "domains[0].ca_certs[1] ('server.pem', CN=example): not valid until \
             2026-01-01T00:00:00Z"
        );
    }

    #[test]
    fn publishing_replaces_the_series_of_the_previous_config() {
        let m = Metrics::new();
        publish(&m, &[cert("old", 0, 1_700_000_000)]);
        publish(
            &m,
            &[cert("a", 0, 1_800_000_000), cert("b", 0, 1_900_000_000)],
        );
        let text = m.encode();
        assert!(!text.contains("key=\"old\""), "{text}");
        assert!(
            text.contains(
                "portcullis_certificate_expiry_timestamp_seconds{key=\"a\",file=\"server.pem\",\
                 subject=\"CN=example\"} 1800000000"
            ),
            "{text}"
        );
        assert!(text.contains("key=\"b\""), "{text}");
    }
}
