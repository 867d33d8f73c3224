//! The simulated endpoints and their names (used by stats, faults and latency settings).

use hyper::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    OauthAuthorize,
    OauthToken,
    OauthIntrospect,
    OauthRevoke,
    UsersMe,
    UsersList,
    Search,
    PagesRetrieve,
    PagesCreate,
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Endpoint::OauthAuthorize,
        Endpoint::OauthToken,
        Endpoint::OauthIntrospect,
        Endpoint::OauthRevoke,
        Endpoint::UsersMe,
        Endpoint::UsersList,
        Endpoint::Search,
        Endpoint::PagesRetrieve,
        Endpoint::PagesCreate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::OauthAuthorize => "oauth.authorize",
            Endpoint::OauthToken => "oauth.token",
            Endpoint::OauthIntrospect => "oauth.introspect",
            Endpoint::OauthRevoke => "oauth.revoke",
            Endpoint::UsersMe => "users.me",
            Endpoint::UsersList => "users.list",
            Endpoint::Search => "search",
            Endpoint::PagesRetrieve => "pages.retrieve",
            Endpoint::PagesCreate => "pages.create",
        }
    }

    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Routes a request; `None` is Notion's `invalid_request_url`.
    pub fn route<'p>(method: &Method, path: &'p str) -> Option<(Endpoint, Option<&'p str>)> {
        let endpoint = match (method, path) {
            (&Method::GET | &Method::POST, "/v1/oauth/authorize") => Endpoint::OauthAuthorize,
            (&Method::POST, "/v1/oauth/token") => Endpoint::OauthToken,
            (&Method::POST, "/v1/oauth/introspect") => Endpoint::OauthIntrospect,
            (&Method::POST, "/v1/oauth/revoke") => Endpoint::OauthRevoke,
            (&Method::GET, "/v1/users/me") => Endpoint::UsersMe,
            (&Method::GET, "/v1/users") => Endpoint::UsersList,
            (&Method::POST, "/v1/search") => Endpoint::Search,
            (&Method::POST, "/v1/pages") => Endpoint::PagesCreate,
            (&Method::GET, _) => {
                let id = path.strip_prefix("/v1/pages/")?;
                if id.is_empty() || id.contains('/') {
                    return None;
                }
                return Some((Endpoint::PagesRetrieve, Some(id)));
            }
            _ => return None,
        };
        Some((endpoint, None))
    }
}
