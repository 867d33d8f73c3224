//! The simulated Notion: workspaces, users, bots, pages, codes and tokens, and the rules that
//! move them (authorization, code exchange, refresh rotation, revocation, uninstall).
//!
//! Everything here is plain data behind one `std::sync::Mutex` held by the server for the length
//! of one operation; no operation awaits or does I/O while holding it.
//! Token lookups are single `HashMap` probes.
//! Dead tokens are kept (marked dead) so that a reused refresh token can be told apart from an
//! unknown one, and so that stats can attribute requests to a bot.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::clock::Moment;
use crate::config::{PreviousPairPolicy, ReauthMode, RefreshReusePolicy, SimConfig};
use crate::token;

/// Ids are shared between many records; `Arc<str>` makes those copies a reference-count bump.
pub(crate) type Id = Arc<str>;

const DEFAULT_WORKSPACE: &str = "00000000-0000-4000-8000-00000000a001";
const DEFAULT_USER: &str = "00000000-0000-4000-8000-00000000b001";

/// Every new workspace starts with these pages; the authorizing user shares all but the last
/// with the bot, so tests always have a page the bot cannot see.
const SEED_PAGES: [&str; 3] = ["Getting Started", "Team Wiki", "Private Notes"];
const SHARED_SEED_PAGES: usize = 2;

pub(crate) struct Workspace {
    pub id: Id,
    pub name: String,
    pub seq: u64,
    pub page_ids: Vec<Id>,
    pub member_ids: Vec<Id>,
}

pub(crate) struct User {
    pub id: Id,
    pub name: String,
    pub email: String,
}

pub(crate) struct Bot {
    pub id: Id,
    pub workspace_id: Id,
    pub user_id: Id,
    pub installed: bool,
    pub seq: u64,
    /// Every authorization of this bot starts a grant; refreshes extend it.
    pub grants: Vec<u64>,
    /// Live access tokens in minting order: the last one is the newest.
    pub live_access: Vec<Id>,
}

pub(crate) enum PageParent {
    Workspace,
    Page(Id),
}

pub(crate) struct Page {
    pub id: Id,
    pub workspace_id: Id,
    pub parent: PageParent,
    pub title: String,
    pub created_by: Id,
    pub created_time: String,
    pub seq: u64,
    pub shared_with: HashSet<Id>,
}

struct AccessRecord {
    bot_id: Id,
    grant: u64,
    issued: Instant,
    iat_ms: i64,
    live: bool,
}

#[derive(Clone, Copy)]
enum RefreshState {
    Live,
    /// Used once at that instant; what reusing it does depends on the reuse policy.
    Rotated(Instant),
    Dead,
}

struct RefreshRecord {
    bot_id: Id,
    grant: u64,
    iat_ms: i64,
    state: RefreshState,
}

/// A chain of pairs: one authorization and the refreshes that descend from it.
struct Grant {
    access: Vec<Id>,
    refresh: Vec<Id>,
}

struct CodeRecord {
    client_id: String,
    bot_id: Id,
    /// The `redirect_uri` the authorize URL carried, if any.
    authorize_redirect_uri: Option<String>,
    expires: Instant,
    used: bool,
}

/// Who the next auto-approved authorization is, queued by `POST /_sim/next-authorization`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NextAuthorization {
    pub workspace_id: Option<String>,
    pub user_id: Option<String>,
    pub outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Approve,
    Deny,
}

/// An identity offered on the consent page: the form's value and what the person reads.
pub(crate) struct IdentityChoice {
    pub value: String,
    pub label: String,
}

/// Who the person said they are on the consent page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Picked {
    /// An existing user (or the default one) in a workspace.
    User { workspace: Id, user: Id },
    /// A new user in an existing workspace.
    NewUserIn(Id),
    /// A new user in a new workspace.
    New,
}

/// A token-endpoint refusal, in OAuth terms.
#[derive(Debug)]
pub(crate) struct GrantError {
    pub error: &'static str,
    pub description: &'static str,
}

fn refuse<T>(error: &'static str, description: &'static str) -> Result<T, GrantError> {
    Err(GrantError { error, description })
}

/// A pair handed out by the token endpoint, with what the response needs to describe it.
pub(crate) struct Issued {
    pub access_token: Id,
    pub refresh_token: Id,
    pub bot_id: Id,
    pub workspace_id: Id,
    pub workspace_name: String,
    pub user: UserView,
}

#[derive(Clone)]
pub(crate) struct UserView {
    pub id: Id,
    pub name: String,
    pub email: String,
}

/// The bot behind a valid bearer token.
pub(crate) struct Caller {
    pub bot_id: Id,
    pub workspace_id: Id,
    pub token_is_newest_live: bool,
}

/// What a token (of either kind) is known to belong to, dead or alive.
pub(crate) struct TokenOwner {
    pub bot_id: Id,
    pub is_newest_live: bool,
}

#[derive(Default)]
pub(crate) struct World {
    seq: u64,
    next_grant: u64,
    workspaces: HashMap<Id, Workspace>,
    users: HashMap<Id, User>,
    bots: HashMap<Id, Bot>,
    /// The installed bot of each (workspace, user) pair, for re-authorizations.
    bot_by_identity: HashMap<(Id, Id), Id>,
    pages: HashMap<Id, Page>,
    access: HashMap<Id, AccessRecord>,
    refresh: HashMap<Id, RefreshRecord>,
    grants: HashMap<u64, Grant>,
    codes: HashMap<String, CodeRecord>,
    queue: VecDeque<NextAuthorization>,
}

/// Notion reports creation times rounded down to the minute.
fn notion_time(now: Moment) -> String {
    now.utc.format("%Y-%m-%dT%H:%M:00.000Z").to_string()
}

impl World {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn queue_authorization(&mut self, next: NextAuthorization) -> usize {
        self.queue.push_back(next);
        self.queue.len()
    }

    /// Who is authorizing now: the queue's head, else the default (or a fresh) identity; or,
    /// when given, the identity the person picked on the consent page (the queue's head is
    /// still consumed, for its outcome).
    pub fn next_identity_as(
        &mut self,
        config: &SimConfig,
        now: Moment,
        picked: Option<Picked>,
    ) -> (Id, Id, Outcome) {
        let mut next = self.queue.pop_front().unwrap_or_default();
        match picked {
            Some(Picked::User { workspace, user }) => {
                next.workspace_id = Some(workspace.to_string());
                next.user_id = Some(user.to_string());
            }
            Some(Picked::NewUserIn(workspace)) => {
                next.workspace_id = Some(workspace.to_string());
                next.user_id = Some(token::uuid());
            }
            Some(Picked::New) => {
                next.workspace_id = Some(token::uuid());
                next.user_id = Some(token::uuid());
            }
            None => {}
        }
        let fresh = config.fresh_identity;
        let workspace_id: Id = match next.workspace_id {
            Some(id) => id.into(),
            None if fresh => token::uuid().into(),
            None => DEFAULT_WORKSPACE.into(),
        };
        let user_id: Id = match next.user_id {
            Some(id) => id.into(),
            None if fresh => token::uuid().into(),
            None => DEFAULT_USER.into(),
        };
        self.ensure_workspace(&workspace_id, now);
        self.ensure_user(&user_id, &workspace_id);
        (
            workspace_id,
            user_id,
            next.outcome.unwrap_or(Outcome::Approve),
        )
    }

    /// What the consent page offers: every user of every workspace, a new user in each
    /// workspace, and a new workspace; and which of them `next_identity` would pick now.
    pub fn identity_choices(&self, config: &SimConfig) -> (Vec<IdentityChoice>, String) {
        let mut choices = Vec::new();
        for ws in self.workspaces() {
            for user_id in &ws.member_ids {
                if let Some(user) = self.users.get(user_id) {
                    choices.push(IdentityChoice {
                        value: format!("user:{}:{}", ws.id, user.id),
                        label: format!("{} ({}) in {}", user.name, user.email, ws.name),
                    });
                }
            }
            choices.push(IdentityChoice {
                value: format!("new-user:{}", ws.id),
                label: format!("A new user in {}", ws.name),
            });
        }
        let head = self.queue.front().cloned().unwrap_or_default();
        let predicted = match (head.workspace_id, head.user_id) {
            (Some(ws), Some(user)) => Some(format!("user:{ws}:{user}")),
            (None, None) if config.fresh_identity => None,
            (ws, user) => Some(format!(
                "user:{}:{}",
                ws.as_deref().unwrap_or(DEFAULT_WORKSPACE),
                user.as_deref().unwrap_or(DEFAULT_USER)
            )),
        };
        let default = match predicted {
            Some(value) if choices.iter().any(|c| c.value == value) => value,
            Some(value) => {
                // The identity the simulator would pick does not exist yet: it is made on
                // approval, as without the choice.
                choices.insert(
                    0,
                    IdentityChoice {
                        value: value.clone(),
                        label: "The simulator's default user, in a new workspace".into(),
                    },
                );
                value
            }
            None => "new".into(),
        };
        choices.push(IdentityChoice {
            value: "new".into(),
            label: "A new user in a new workspace".into(),
        });
        (choices, default)
    }

    /// Reads a choice of the consent page. Ids must be a known workspace and user, or the
    /// simulator's defaults (made on approval, as they would be without the choice).
    pub fn parse_choice(&self, value: &str) -> Option<Picked> {
        let known_ws = |id: &str| self.workspaces.contains_key(id) || id == DEFAULT_WORKSPACE;
        let known_user = |id: &str| self.users.contains_key(id) || id == DEFAULT_USER;
        if value == "new" {
            return Some(Picked::New);
        }
        if let Some(ws) = value.strip_prefix("new-user:") {
            return self
                .workspaces
                .get_key_value(ws)
                .map(|(id, _)| Picked::NewUserIn(id.clone()));
        }
        let (ws, user) = value.strip_prefix("user:")?.split_once(':')?;
        (known_ws(ws) && known_user(user)).then(|| Picked::User {
            workspace: ws.into(),
            user: user.into(),
        })
    }

    fn ensure_workspace(&mut self, id: &Id, now: Moment) {
        if self.workspaces.contains_key(id) {
            return;
        }
        let seq = self.next_seq();
        let mut page_ids = Vec::with_capacity(SEED_PAGES.len());
        for title in SEED_PAGES {
            let page_id: Id = token::uuid().into();
            let page_seq = self.next_seq();
            self.pages.insert(
                page_id.clone(),
                Page {
                    id: page_id.clone(),
                    workspace_id: id.clone(),
                    parent: PageParent::Workspace,
                    title: title.to_owned(),
                    created_by: DEFAULT_USER.into(),
                    created_time: notion_time(now),
                    seq: page_seq,
                    shared_with: HashSet::new(),
                },
            );
            page_ids.push(page_id);
        }
        self.workspaces.insert(
            id.clone(),
            Workspace {
                id: id.clone(),
                name: format!("Workspace {seq}"),
                seq,
                page_ids,
                member_ids: Vec::new(),
            },
        );
    }

    fn ensure_user(&mut self, id: &Id, workspace_id: &Id) {
        if !self.users.contains_key(id) {
            let n = self.next_seq();
            self.users.insert(
                id.clone(),
                User {
                    id: id.clone(),
                    name: format!("Sim User {n}"),
                    email: format!("user{n}@example.com"),
                },
            );
        }
        if let Some(ws) = self.workspaces.get_mut(workspace_id) {
            if !ws.member_ids.contains(id) {
                ws.member_ids.push(id.clone());
            }
        }
    }

    /// The user approves the consent page: the bot is installed (or found again) and the user
    /// shares the seed pages with it.
    pub fn approve(&mut self, config: &SimConfig, workspace_id: &Id, user_id: &Id) -> Id {
        let key = (workspace_id.clone(), user_id.clone());
        let existing = self
            .bot_by_identity
            .get(&key)
            .filter(|id| self.bots.get(*id).is_some_and(|b| b.installed))
            .cloned();
        let bot_id = match existing {
            Some(id) if !config.new_bot_id_on_reauth => id,
            _ => {
                let id: Id = token::uuid().into();
                let seq = self.next_seq();
                self.bots.insert(
                    id.clone(),
                    Bot {
                        id: id.clone(),
                        workspace_id: workspace_id.clone(),
                        user_id: user_id.clone(),
                        installed: true,
                        seq,
                        grants: Vec::new(),
                        live_access: Vec::new(),
                    },
                );
                self.bot_by_identity.insert(key, id.clone());
                id
            }
        };
        if let Some(ws) = self.workspaces.get(workspace_id) {
            for page_id in ws.page_ids.iter().take(SHARED_SEED_PAGES) {
                if let Some(page) = self.pages.get_mut(page_id) {
                    page.shared_with.insert(bot_id.clone());
                }
            }
        }
        bot_id
    }

    pub fn issue_code(
        &mut self,
        config: &SimConfig,
        bot_id: Id,
        authorize_redirect_uri: Option<String>,
        now: Moment,
    ) -> String {
        // Expired and used codes are swept here, so the map only holds codes that could matter.
        if self.codes.len() > 1024 {
            self.codes.retain(|_, c| !c.used && c.expires > now.instant);
        }
        let code = token::uuid();
        self.codes.insert(
            code.clone(),
            CodeRecord {
                client_id: config.client_id.clone(),
                bot_id,
                authorize_redirect_uri,
                expires: now.instant + config.code_ttl,
                used: false,
            },
        );
        code
    }

    /// The bot a code or refresh token was issued to, without consuming it (for stats).
    pub fn bot_of_grant_input(&self, code: Option<&str>, refresh: Option<&str>) -> Option<Id> {
        if let Some(code) = code {
            return self.codes.get(code).map(|c| c.bot_id.clone());
        }
        refresh.and_then(|r| self.refresh.get(r).map(|r| r.bot_id.clone()))
    }

    /// `grant_type=authorization_code`, with the conditional `redirect_uri` rule of
    /// notion-wire.md §2.
    pub fn exchange_code(
        &mut self,
        config: &SimConfig,
        code: &str,
        redirect_uri: Option<&str>,
        now: Moment,
    ) -> Result<Issued, GrantError> {
        let Some(record) = self.codes.get_mut(code) else {
            return refuse("invalid_grant", "The authorization code is invalid.");
        };
        if record.used {
            return refuse("invalid_grant", "The authorization code was already used.");
        }
        if record.expires <= now.instant {
            return refuse("invalid_grant", "The authorization code has expired.");
        }
        if record.client_id != config.client_id {
            return refuse(
                "invalid_grant",
                "The authorization code was issued to another client.",
            );
        }
        let required = record.authorize_redirect_uri.is_some() || config.redirect_uris.len() > 1;
        let rejected = record.authorize_redirect_uri.is_none() && config.redirect_uris.len() == 1;
        match (redirect_uri, &record.authorize_redirect_uri) {
            (None, _) if required => {
                return refuse("invalid_request", "redirect_uri is required.");
            }
            (Some(_), _) if rejected => {
                return refuse(
                    "invalid_request",
                    "redirect_uri must be omitted: the authorization request did not carry one.",
                );
            }
            (Some(given), Some(expected)) if given != expected => {
                return refuse(
                    "invalid_grant",
                    "redirect_uri does not match the authorization request.",
                );
            }
            _ => {}
        }
        record.used = true;
        let bot_id = record.bot_id.clone();
        if !self.bots.get(&bot_id).is_some_and(|b| b.installed) {
            return refuse("invalid_grant", "The connection was removed.");
        }
        if config.reauth == ReauthMode::Legacy {
            if let Some(issued) = self.active_pair(&bot_id) {
                return Ok(issued);
            }
        }
        let previous: Vec<u64> = self.bots[&bot_id].grants.clone();
        match config.previous_pair {
            PreviousPairPolicy::Keep => {}
            PreviousPairPolicy::KillRefresh => {
                for grant in &previous {
                    self.kill_grant(*grant, false);
                }
            }
            PreviousPairPolicy::KillBoth => {
                for grant in &previous {
                    self.kill_grant(*grant, true);
                }
            }
        }
        self.next_grant += 1;
        let grant = self.next_grant;
        self.grants.insert(
            grant,
            Grant {
                access: Vec::new(),
                refresh: Vec::new(),
            },
        );
        if let Some(bot) = self.bots.get_mut(&bot_id) {
            bot.grants.push(grant);
        }
        Ok(self.mint(&bot_id, grant, now))
    }

    /// `grant_type=refresh_token`: rotation, and the configured answer to reuse.
    pub fn refresh(
        &mut self,
        config: &SimConfig,
        refresh_token: &str,
        now: Moment,
    ) -> Result<Issued, GrantError> {
        let Some(record) = self.refresh.get_mut(refresh_token) else {
            return refuse("invalid_grant", "The refresh token is invalid.");
        };
        let (bot_id, grant) = (record.bot_id.clone(), record.grant);
        match record.state {
            RefreshState::Live => record.state = RefreshState::Rotated(now.instant),
            RefreshState::Dead => {
                return refuse("invalid_grant", "The refresh token is invalid.");
            }
            RefreshState::Rotated(used_at) => match config.refresh_reuse {
                RefreshReusePolicy::Reject => {
                    return refuse("invalid_grant", "The refresh token was already used.");
                }
                RefreshReusePolicy::Grace
                    if now.instant.saturating_duration_since(used_at) <= config.refresh_grace => {}
                RefreshReusePolicy::Grace => {
                    return refuse("invalid_grant", "The refresh token was already used.");
                }
                RefreshReusePolicy::RevokeGrant => {
                    self.kill_grant(grant, true);
                    return refuse(
                        "invalid_grant",
                        "The refresh token was already used; the authorization was revoked.",
                    );
                }
            },
        }
        Ok(self.mint(&bot_id, grant, now))
    }

    /// Legacy re-authorization: the bot's newest live access token and its live refresh token.
    fn active_pair(&self, bot_id: &Id) -> Option<Issued> {
        let bot = self.bots.get(bot_id)?;
        let access = bot.live_access.last()?;
        let grant = self.access.get(access)?.grant;
        let refresh = self.grants.get(&grant)?.refresh.last()?;
        if !matches!(self.refresh.get(refresh)?.state, RefreshState::Live) {
            return None;
        }
        Some(self.describe(bot, access.clone(), refresh.clone()))
    }

    fn mint(&mut self, bot_id: &Id, grant: u64, now: Moment) -> Issued {
        let access: Id = token::access_token().into();
        let refresh: Id = token::refresh_token().into();
        let iat_ms = now.utc.timestamp_millis();
        self.access.insert(
            access.clone(),
            AccessRecord {
                bot_id: bot_id.clone(),
                grant,
                issued: now.instant,
                iat_ms,
                live: true,
            },
        );
        self.refresh.insert(
            refresh.clone(),
            RefreshRecord {
                bot_id: bot_id.clone(),
                grant,
                iat_ms,
                state: RefreshState::Live,
            },
        );
        if let Some(g) = self.grants.get_mut(&grant) {
            g.access.push(access.clone());
            g.refresh.push(refresh.clone());
        }
        let bot = self.bots.get_mut(bot_id).expect("minting for a known bot");
        bot.live_access.push(access.clone());
        let bot = &self.bots[bot_id];
        self.describe(bot, access, refresh)
    }

    fn describe(&self, bot: &Bot, access_token: Id, refresh_token: Id) -> Issued {
        let workspace_name = self
            .workspaces
            .get(&bot.workspace_id)
            .map(|w| w.name.clone())
            .unwrap_or_default();
        Issued {
            access_token,
            refresh_token,
            bot_id: bot.id.clone(),
            workspace_id: bot.workspace_id.clone(),
            workspace_name,
            user: self.user_view(&bot.user_id),
        }
    }

    pub fn user_view(&self, user_id: &Id) -> UserView {
        match self.users.get(user_id) {
            Some(u) => UserView {
                id: u.id.clone(),
                name: u.name.clone(),
                email: u.email.clone(),
            },
            None => UserView {
                id: user_id.clone(),
                name: String::new(),
                email: String::new(),
            },
        }
    }

    /// Kills the refresh tokens (and, with `access`, the access tokens) of one grant.
    fn kill_grant(&mut self, grant: u64, access: bool) {
        let Some(g) = self.grants.get(&grant) else {
            return;
        };
        for token in &g.refresh {
            if let Some(r) = self.refresh.get_mut(token) {
                r.state = RefreshState::Dead;
            }
        }
        if access {
            let tokens = g.access.clone();
            for token in &tokens {
                self.kill_access(token);
            }
        }
    }

    fn kill_access(&mut self, token: &str) {
        let Some(record) = self.access.get_mut(token) else {
            return;
        };
        if !record.live {
            return;
        }
        record.live = false;
        if let Some(bot) = self.bots.get_mut(&record.bot_id) {
            if let Some(pos) = bot.live_access.iter().rposition(|t| &**t == token) {
                bot.live_access.remove(pos);
            }
        }
    }

    fn access_is_live(config: &SimConfig, record: &AccessRecord, now: Moment) -> bool {
        record.live
            && config
                .access_token_ttl
                .is_none_or(|ttl| now.instant.saturating_duration_since(record.issued) < ttl)
    }

    /// The bot behind a bearer token, if the token is live.
    pub fn authenticate(&self, config: &SimConfig, token: &str, now: Moment) -> Option<Caller> {
        let record = self.access.get(token)?;
        if !Self::access_is_live(config, record, now) {
            return None;
        }
        let bot = self.bots.get(&record.bot_id)?;
        Some(Caller {
            bot_id: bot.id.clone(),
            workspace_id: bot.workspace_id.clone(),
            token_is_newest_live: bot.live_access.last().is_some_and(|t| &**t == token),
        })
    }

    /// Whom a token of either kind belongs to, for the request log.
    pub fn token_owner(&self, config: &SimConfig, token: &str, now: Moment) -> Option<TokenOwner> {
        if let Some(record) = self.access.get(token) {
            let live = Self::access_is_live(config, record, now);
            let newest = self
                .bots
                .get(&record.bot_id)
                .and_then(|b| b.live_access.last())
                .is_some_and(|t| &**t == token);
            return Some(TokenOwner {
                bot_id: record.bot_id.clone(),
                is_newest_live: live && newest,
            });
        }
        let record = self.refresh.get(token)?;
        let newest = self
            .grants
            .get(&record.grant)
            .and_then(|g| g.refresh.last())
            .is_some_and(|t| &**t == token);
        Some(TokenOwner {
            bot_id: record.bot_id.clone(),
            is_newest_live: newest && matches!(record.state, RefreshState::Live),
        })
    }

    /// `POST /v1/oauth/introspect`: the `iat` (milliseconds) of a live token.
    pub fn introspect(&self, config: &SimConfig, token: &str, now: Moment) -> Option<i64> {
        if let Some(record) = self.access.get(token) {
            return Self::access_is_live(config, record, now).then_some(record.iat_ms);
        }
        let record = self.refresh.get(token)?;
        matches!(record.state, RefreshState::Live).then_some(record.iat_ms)
    }

    /// `POST /v1/oauth/revoke`: the token given dies; its partner is left alone.
    pub fn revoke_token(&mut self, token: &str) {
        if self.access.contains_key(token) {
            self.kill_access(token);
        } else if let Some(record) = self.refresh.get_mut(token) {
            record.state = RefreshState::Dead;
        }
    }

    /// The user removes the connection: every token of the bot dies.
    pub fn uninstall(&mut self, bot_id: &str) -> bool {
        let Some(bot) = self.bots.get_mut(bot_id) else {
            return false;
        };
        bot.installed = false;
        let grants = bot.grants.clone();
        for grant in grants {
            self.kill_grant(grant, true);
        }
        true
    }

    pub fn bot(&self, bot_id: &str) -> Option<&Bot> {
        self.bots.get(bot_id)
    }

    pub fn workspace(&self, id: &str) -> Option<&Workspace> {
        self.workspaces.get(id)
    }

    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.get(id)
    }

    pub fn page(&self, id: &str) -> Option<&Page> {
        self.pages.get(id)
    }

    /// A page the bot may see: in its workspace and shared with it.
    pub fn visible_page(&self, bot_id: &Id, page_id: &str) -> Option<&Page> {
        self.pages
            .get(page_id)
            .filter(|p| p.shared_with.contains(bot_id))
    }

    pub fn search(&self, bot_id: &Id, workspace_id: &Id, query: &str) -> Vec<&Page> {
        let Some(ws) = self.workspaces.get(workspace_id) else {
            return Vec::new();
        };
        let query = query.to_lowercase();
        let mut found: Vec<&Page> = ws
            .page_ids
            .iter()
            .filter_map(|id| self.visible_page(bot_id, id))
            .filter(|p| query.is_empty() || p.title.to_lowercase().contains(&query))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.seq));
        found
    }

    pub fn create_page(&mut self, bot_id: &Id, parent_id: &Id, title: String, now: Moment) -> Id {
        let workspace_id = self.pages[parent_id].workspace_id.clone();
        let created_by = bot_id.clone();
        let id: Id = token::uuid().into();
        let seq = self.next_seq();
        self.pages.insert(
            id.clone(),
            Page {
                id: id.clone(),
                workspace_id: workspace_id.clone(),
                parent: PageParent::Page(parent_id.clone()),
                title,
                created_by,
                created_time: notion_time(now),
                seq,
                shared_with: HashSet::from([bot_id.clone()]),
            },
        );
        if let Some(ws) = self.workspaces.get_mut(&workspace_id) {
            ws.page_ids.push(id.clone());
        }
        id
    }

    /// Bots in creation order.
    pub fn bots(&self) -> Vec<&Bot> {
        let mut bots: Vec<&Bot> = self.bots.values().collect();
        bots.sort_by_key(|b| b.seq);
        bots
    }

    /// Workspaces in creation order.
    pub fn workspaces(&self) -> Vec<&Workspace> {
        let mut list: Vec<&Workspace> = self.workspaces.values().collect();
        list.sort_by_key(|w| w.seq);
        list
    }

    /// The live refresh token of each of the bot's grants.
    pub fn live_refresh_tokens(&self, bot: &Bot) -> Vec<Id> {
        bot.grants
            .iter()
            .filter_map(|g| self.grants.get(g)?.refresh.last())
            .filter(|t| {
                self.refresh
                    .get(*t)
                    .is_some_and(|r| matches!(r.state, RefreshState::Live))
            })
            .cloned()
            .collect()
    }

    /// Live access tokens of a bot, counting the TTL.
    pub fn live_access_tokens(&self, config: &SimConfig, bot: &Bot, now: Moment) -> Vec<Id> {
        bot.live_access
            .iter()
            .filter(|t| {
                self.access
                    .get(*t)
                    .is_some_and(|r| Self::access_is_live(config, r, now))
            })
            .cloned()
            .collect()
    }

    pub fn bots_in_workspace<'a>(
        &'a self,
        workspace_id: &'a Id,
    ) -> impl Iterator<Item = &'a Bot> + 'a {
        self.bots
            .values()
            .filter(move |b| &b.workspace_id == workspace_id && b.installed)
    }
}
