//! The HTML that tokenkeeper serves to people: askama templates (`crates/tokenkeeper/templates/`,
//! escaped by default), the stylesheet and the console's one optional script, the landing page
//! `/`, and the page a user lands on after connecting without a `return_to`.
//!
//! Every page shares one look: `templates/base.html` and `assets/tokenkeeper.css`. Pages that
//! can be shown without the application's state (the error pages `api::server` writes) carry
//! the stylesheet inline; the others link to `/assets/tokenkeeper.css`.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::SharedState;

/// The stylesheet of every page.
pub const STYLESHEET: &str = include_str!("../../assets/tokenkeeper.css");
/// The console's optional script (copy buttons).
pub const SCRIPT: &str = include_str!("../../assets/console.js");

/// Renders `page` with `status`, never cached: pages show state that changes, and some are
/// a user's own.
pub fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => {
            let mut response = (status, Html(html)).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            tracing::error!("a page could not be rendered: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "tokenkeeper could not render this page; see its log",
            )
                .into_response()
        }
    }
}

/// The path under which tokenkeeper's pages are, from the public URL (`""` at the root, else
/// `/prefix`): links and cookies of the pages are made under it.
pub fn base(state: &SharedState) -> String {
    state.public_url.path().trim_end_matches('/').to_owned()
}

/// A link on a page.
pub struct Link {
    pub href: String,
    pub label: String,
}

/// A page that says what happened (errors, dead ends, a kept authorization).
#[derive(Template)]
#[template(path = "message.html")]
pub struct Message<'a> {
    pub base: &'a str,
    pub css: &'a str,
    pub title: &'a str,
    pub text: &'a str,
    pub link: Option<Link>,
    /// Looks again at this URL every two seconds.
    pub refresh: Option<&'a str>,
}

impl<'a> Message<'a> {
    pub fn new(title: &'a str, text: &'a str) -> Self {
        Message {
            base: "",
            css: STYLESHEET,
            title,
            text,
            link: None,
            refresh: None,
        }
    }
}

/// `GET /assets/tokenkeeper.css` and `GET /assets/console.js`: cached for an hour (they change
/// only with the binary).
pub async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "landing.html")]
struct Landing {
    base: String,
}

/// `/` without the built-in simulator: what this is, and where the console is.
pub fn landing(state: &SharedState) -> Response {
    render(StatusCode::OK, &Landing { base: base(state) })
}

#[derive(Template)]
#[template(path = "connected.html")]
struct Connected {
    base: String,
    title: &'static str,
    text: &'static str,
    close: bool,
}

#[derive(Deserialize)]
pub struct DoneQuery {
    status: Option<String>,
}

/// Where a connect session made without `return_to` sends the user back: the callback
/// redirects here with `connection_id` and `status`, as it would to an app. The page reads
/// nothing from the database (it needs no key, and anyone may open it): it only puts the
/// status in words.
pub async fn connect_done(
    State(state): State<SharedState>,
    Query(q): Query<DoneQuery>,
) -> Response {
    let (title, text, close) = match q.status.as_deref() {
        Some("connected") => (
            "Connected",
            "Your Notion workspace is connected.",
            true,
        ),
        Some("reconnected") => (
            "Connected again",
            "Your Notion workspace is connected again; nothing else is needed.",
            true,
        ),
        Some("denied") => (
            "Not connected",
            "You cancelled at Notion, so nothing was connected. Go back to the application to try again.",
            false,
        ),
        _ => (
            "Not connected",
            "Notion did not complete the connection. Go back to the application to try again.",
            false,
        ),
    };
    render(
        StatusCode::OK,
        &Connected {
            base: base(&state),
            title,
            text,
            close,
        },
    )
}

/// A moment for a page: relative to now in words, exact in a `title` and in `datetime`.
#[derive(Debug, Clone)]
pub struct When {
    pub iso: String,
    pub exact: String,
    pub relative: String,
}

/// A `<time>` element: the relative time as its text, the exact time in its `title` (shown on
/// hover) and `datetime`. Written whole here, and marked safe for templates, because every part
/// is formatted by us from a time (escaped all the same).
impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = askama::filters::Html;
        write!(
            f,
            "<time datetime=\"{}\" title=\"{}\">{}</time>",
            askama::filters::escape(&self.iso, e).map_err(|_| std::fmt::Error)?,
            askama::filters::escape(&self.exact, e).map_err(|_| std::fmt::Error)?,
            askama::filters::escape(&self.relative, e).map_err(|_| std::fmt::Error)?,
        )
    }
}

impl askama::filters::HtmlSafe for When {}

impl When {
    pub fn of(at: DateTime<Utc>, now: DateTime<Utc>) -> When {
        When {
            iso: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            exact: at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            relative: relative(at, now),
        }
    }
}

/// "3 minutes ago", "in 2 hours": the one unit a person reads at a glance. Written here rather
/// than with `humantime`, which prints every unit ("2h 13m 5s") and has no "ago".
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds();
    let (n, ago) = (seconds.unsigned_abs(), seconds >= 0);
    if n < 45 {
        return if ago { "just now" } else { "in a moment" }.to_owned();
    }
    let (count, unit) = match n {
        n if n < 45 * 60 => ((n + 30) / 60, "minute"),
        n if n < 36 * 3600 => ((n + 1800) / 3600, "hour"),
        n if n < 60 * 86400 => ((n + 43200) / 86400, "day"),
        n => ((n + 15 * 86400) / (30 * 86400), "month"),
    };
    let unit = if count == 1 {
        unit.to_owned()
    } else {
        format!("{unit}s")
    };
    if ago {
        format!("{count} {unit} ago")
    } else {
        format!("in {count} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_in_one_unit() {
        let now = DateTime::parse_from_rfc3339("2026-06-08T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let ago = |s: i64| relative(now - chrono::Duration::seconds(s), now);
        assert_eq!(ago(3), "just now");
        assert_eq!(ago(50), "1 minute ago");
        assert_eq!(ago(61), "1 minute ago");
        assert_eq!(ago(150), "3 minutes ago");
        assert_eq!(ago(50 * 60), "1 hour ago");
        assert_eq!(ago(3 * 3600), "3 hours ago");
        assert_eq!(ago(2 * 86400), "2 days ago");
        assert_eq!(ago(90 * 86400), "3 months ago");
        assert_eq!(ago(-600), "in 10 minutes");
        let when = When::of(now - chrono::Duration::seconds(3600), now);
        assert_eq!(when.iso, "2026-06-08T11:00:00Z");
        assert_eq!(when.exact, "2026-06-08 11:00:00 UTC");
        assert_eq!(when.relative, "1 hour ago");
    }

    #[test]
    fn pages_escape_what_they_show() {
        let html = Message::new("<b>t</b>", "\"x\" & <script>")
            .render()
            .unwrap();
        assert!(html.contains("&#60;b&#62;t&#60;/b&#62;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
    }
}
