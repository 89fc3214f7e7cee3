//! Requests of the kubelet HTTP API parsed into what they ask for, apart from any I/O, so
//! every bad path or query value has its own tested, specific error.

use k8s_openapi::jiff::Timestamp;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Pods,
    Metrics,
    ContainerLogs {
        namespace: String,
        pod: String,
        container: String,
        options: LogOptions,
    },
}

/// The query of `/containerLogs`, named as in upstream's `PodLogOptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    /// Only records at or after this time (`sinceSeconds` is turned into a time on parse).
    pub since: Option<Since>,
    pub limit_bytes: Option<u64>,
}

/// `sinceSeconds` or `sinceTime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    Seconds(u64),
    Time(Timestamp),
}

impl Since {
    /// The earliest record time to show, given the current time.
    pub fn cutoff(self, now: Timestamp) -> Timestamp {
        match self {
            Since::Time(t) => t,
            Since::Seconds(s) => {
                let nanos = now.as_nanosecond() - i128::from(s) * 1_000_000_000;
                Timestamp::from_nanosecond(nanos).unwrap_or(Timestamp::MIN)
            }
        }
    }
}

/// Why a request is refused; `status` is the HTTP code to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not allowed; only GET")]
    Method(String),
    #[error("no such path: {0}")]
    NotFound(String),
    #[error("{path}: expected /containerLogs/<namespace>/<pod>/<container>")]
    LogPath { path: String },
    #[error("query parameter {name}={value:?}: {message}")]
    Query {
        name: String,
        value: String,
        message: String,
    },
    #[error("at most one of sinceTime or sinceSeconds may be specified")]
    BothSince,
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Method(_) => 405,
            RequestError::NotFound(_) => 404,
            _ => 400,
        }
    }
}

/// Parses method, path and raw query (without `?`) into a route.
pub fn parse(method: &str, path: &str, query: Option<&str>) -> Result<Route, RequestError> {
    if method != "GET" && method != "HEAD" {
        return Err(RequestError::Method(method.to_owned()));
    }
    let segments: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    match segments.as_slice() {
        ["healthz"] => Ok(Route::Healthz),
        ["pods"] => Ok(Route::Pods),
        ["metrics"] => Ok(Route::Metrics),
        ["containerLogs", rest @ ..] => {
            let [namespace, pod, container] = rest else {
                return Err(RequestError::LogPath {
                    path: path.to_owned(),
                });
            };
            let names = [namespace, pod, container].map(|s| percent_decode(s));
            if names.iter().any(|n| n.is_empty() || n.contains('/')) {
                return Err(RequestError::LogPath {
                    path: path.to_owned(),
                });
            }
            let [namespace, pod, container] = names;
            Ok(Route::ContainerLogs {
                namespace,
                pod,
                container,
                options: parse_log_options(query.unwrap_or_default())?,
            })
        }
        _ => Err(RequestError::NotFound(path.to_owned())),
    }
}

fn query_error(name: &str, value: &str, message: &str) -> RequestError {
    RequestError::Query {
        name: name.to_owned(),
        value: value.to_owned(),
        message: message.to_owned(),
    }
}

/// Booleans as Go's `strconv.ParseBool`, which upstream uses; an empty value means true
/// (`?follow`).
fn parse_bool(name: &str, value: &str) -> Result<bool, RequestError> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(query_error(name, value, "not a boolean")),
    }
}

fn parse_count(name: &str, value: &str, min: u64) -> Result<u64, RequestError> {
    let n: i64 = value
        .parse()
        .map_err(|_| query_error(name, value, "not an integer"))?;
    u64::try_from(n)
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| query_error(name, value, &format!("must be at least {min}")))
}

/// The query of a `/containerLogs` request. Unknown parameters are ignored, as upstream does.
pub fn parse_log_options(query: &str) -> Result<LogOptions, RequestError> {
    let mut options = LogOptions::default();
    let mut since_seconds = None;
    let mut since_time = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name);
        let value = percent_decode(value);
        match name.as_str() {
            "follow" => options.follow = parse_bool(&name, &value)?,
            "previous" => options.previous = parse_bool(&name, &value)?,
            "timestamps" => options.timestamps = parse_bool(&name, &value)?,
            "tailLines" => options.tail_lines = Some(parse_count(&name, &value, 0)?),
            "limitBytes" => options.limit_bytes = Some(parse_count(&name, &value, 1)?),
            "sinceSeconds" => since_seconds = Some(parse_count(&name, &value, 1)?),
            "sinceTime" => {
                let t: Timestamp = value
                    .parse()
                    .map_err(|_| query_error(&name, &value, "not an RFC 3339 time"))?;
                since_time = Some(t);
            }
            _ => {}
        }
    }
    options.since = match (since_seconds, since_time) {
        (Some(_), Some(_)) => return Err(RequestError::BothSince),
        (Some(s), None) => Some(Since::Seconds(s)),
        (None, Some(t)) => Some(Since::Time(t)),
        (None, None) => None,
    };
    Ok(options)
}

/// `%XX` escapes decoded and `+` read as a space (query encoding); invalid escapes are kept
/// as written.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(query: &str) -> Result<LogOptions, RequestError> {
        match parse("GET", "/containerLogs/ns/p/c", Some(query))? {
            Route::ContainerLogs { options, .. } => Ok(options),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_map_to_routes() {
        assert_eq!(parse("GET", "/healthz", None), Ok(Route::Healthz));
        assert_eq!(parse("GET", "/pods/", None), Ok(Route::Pods));
        assert_eq!(parse("GET", "/metrics", None), Ok(Route::Metrics));
        assert_eq!(
            parse("GET", "/containerLogs/default/web/httpd", None),
            Ok(Route::ContainerLogs {
                namespace: "default".into(),
                pod: "web".into(),
                container: "httpd".into(),
                options: LogOptions::default(),
            })
        );
    }

    #[test]
    fn bad_paths_and_methods_are_refused_with_their_own_status() {
        let e = parse("POST", "/pods", None).expect_err("POST");
        assert_eq!(e.status(), 405);
        assert!(e.to_string().contains("POST"), "{e}");
        let e = parse("GET", "/nope", None).expect_err("unknown");
        assert_eq!(e.status(), 404);
        for bad in [
            "/containerLogs/ns/pod",
            "/containerLogs/ns/pod/c/extra",
            "/containerLogs//pod/c",
            "/containerLogs/ns/p%2Fq/c",
        ] {
            let e = parse("GET", bad, None).expect_err(bad);
            assert_eq!(e.status(), 400, "{bad}");
            assert!(e.to_string().contains("/containerLogs/<namespace>"), "{e}");
        }
    }

    #[test]
    fn log_options_parse_as_upstream_names_them() {
        let o = logs("follow=true&previous=1&timestamps=True&tailLines=10&limitBytes=500")
            .expect("options");
        assert!(o.follow && o.previous && o.timestamps);
        assert_eq!(o.tail_lines, Some(10));
        assert_eq!(o.limit_bytes, Some(500));
        assert!(logs("follow").expect("bare").follow);
        assert_eq!(logs("tailLines=0").expect("zero").tail_lines, Some(0));
        assert_eq!(
            logs("sinceSeconds=60").expect("since").since,
            Some(Since::Seconds(60))
        );
        let t = logs("sinceTime=2026-11-22T08%3A00%3A00Z").expect("since time");
        assert_eq!(
            t.since,
            Some(Since::Time("2026-11-22T08:00:00Z".parse().expect("ts")))
        );
        assert_eq!(logs("unknown=x").expect("ignored"), LogOptions::default());
    }

    #[test]
    fn bad_log_options_name_the_parameter() {
        for (query, name) in [
            ("follow=yes", "follow"),
            ("tailLines=-1", "tailLines"),
            ("tailLines=ten", "tailLines"),
            ("limitBytes=0", "limitBytes"),
            ("sinceSeconds=0", "sinceSeconds"),
            ("sinceTime=yesterday", "sinceTime"),
        ] {
            let e = logs(query).expect_err(query);
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(name), "{query}: {e}");
        }
        let e = logs("sinceSeconds=5&sinceTime=2026-11-22T08:00:00Z").expect_err("both");
        assert_eq!(e, RequestError::BothSince);
    }

    #[test]
    fn since_seconds_counts_back_from_now() {
        let now: Timestamp = "2026-11-22T08:00:10Z".parse().expect("ts");
        assert_eq!(
            Since::Seconds(10).cutoff(now),
            "2026-11-22T08:00:00Z".parse::<Timestamp>().expect("ts")
        );
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%3a"), ":");
    }
}
