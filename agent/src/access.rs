//! Who may connect to the MQTT front door, and what each may publish and subscribe to.
//!
//! Invariants:
//! - a client connects only with a user name and password that match the users file (a slow,
//!   salted Argon2id hash per user), or anonymously when `mqtt.auth.allow_anonymous` is set;
//! - with an `mqtt.acl`, everything not granted by a rule is denied; a denied publish is never
//!   stored, a denied subscription never reaches the broker. Without one, every client may do
//!   everything (as before there was an ACL).
//!
//! The decisions ([`Acl::may_publish`], [`Acl::may_subscribe`], [`covers`]) are pure and
//! table-tested; the users file is read once, at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Longest users file read (a gateway's sensors; a larger file is a mistake).
pub const MAX_USERS_FILE_BYTES: u64 = 16 << 20;
/// Longest line of the users file.
pub const MAX_LINE_BYTES: usize = 4096;

/// The users file cannot be used. The agent exits with this before it starts.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct UsersError {
    /// The users file.
    pub file: PathBuf,
    /// 1-based line (0: the file as a whole).
    pub line: usize,
    /// What is wrong and what to do.
    pub reason: String,
}

/// One user of the users file.
#[derive(Debug, Clone)]
struct User {
    /// Argon2id PHC string.
    hash: String,
    groups: Vec<String>,
}

/// The users who may connect, from the users file (`name:hash[:group,group]` per line).
#[derive(Debug, Default)]
pub struct Users {
    users: HashMap<String, User>,
    /// Passwords already verified, by user: a digest keyed per process, so a reconnect costs
    /// no Argon2 run (and the password itself is not kept).
    verified: Mutex<HashMap<String, [u8; 32]>>,
    key: [u8; 32],
}

/// Hashes `password` for the users file: Argon2id with a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

impl Users {
    /// Reads the users file (bounded in size and line length; every line checked).
    pub fn load(file: &Path) -> Result<Users, UsersError> {
        let err = |line, reason: String| UsersError {
            file: file.to_owned(),
            line,
            reason,
        };
        let size = std::fs::metadata(file)
            .map_err(|e| err(0, format!("cannot read: {e}")))?
            .len();
        if size > MAX_USERS_FILE_BYTES {
            return Err(err(
                0,
                format!("{size} bytes is over the limit of {MAX_USERS_FILE_BYTES}"),
            ));
        }
        let text =
            std::fs::read_to_string(file).map_err(|e| err(0, format!("cannot read: {e}")))?;
        Users::parse(&text).map_err(|(line, reason)| err(line, reason))
    }

    /// Parses the users file's text; `Err` is (line, reason). Pure but for the process key.
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.len() > MAX_LINE_BYTES {
                return Err((n, format!("line longer than {MAX_LINE_BYTES} bytes")));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, ':');
            let name = parts.next().unwrap_or_default();
            let (Some(hash), groups) = (parts.next(), parts.next()) else {
                return Err((
                    n,
                    "expected name:hash (from `edge-agent hash-password`)".into(),
                ));
            };
            if name.is_empty() || name.len() > 256 {
                return Err((n, "the user name must be 1-256 bytes".into()));
            }
            PasswordHash::new(hash).map_err(|e| {
                (n, format!("user {name:?}: not a password hash ({e}); make one with `edge-agent hash-password`"))
            })?;
            let groups = groups
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if users
                .insert(
                    name.to_owned(),
                    User {
                        hash: hash.to_owned(),
                        groups,
                    },
                )
                .is_some()
            {
                return Err((n, format!("user {name:?} is listed twice")));
            }
        }
        Ok(Users {
            users,
            verified: Mutex::new(HashMap::new()),
            key: rand::random(),
        })
    }

    /// How many users the file lists.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file lists none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The stored hash of `user`, if the file lists it: a connection that logged in as a user
    /// whose hash is gone or changed since has had its credentials revoked.
    pub fn credential(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(|u| u.hash.as_str())
    }

    /// The groups of `user`.
    pub fn groups(&self, user: &str) -> &[String] {
        self.users.get(user).map_or(&[], |u| u.groups.as_slice())
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.key);
        h.update(password);
        h.finalize().into()
    }

    /// Whether `password` is `user`'s. Slow (Argon2) the first time a password is seen for a
    /// user, then a digest compare: call it off the async threads.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let Some(u) = self.users.get(user) else {
            return false;
        };
        let digest = self.digest(password);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(user)
            .is_some_and(|d| subtle_eq(d, &digest));
        if known {
            return true;
        }
        let ok = PasswordHash::new(&u.hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password, &h)
                .is_ok()
        });
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(user.to_owned(), digest);
        }
        ok
    }
}

fn subtle_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Everything the front door checks: the users, anonymous access, the ACL.
#[derive(Debug, Default)]
pub struct Access {
    /// The users file (empty without one).
    pub users: Users,
    /// Clients without a user name may connect.
    pub allow_anonymous: bool,
    /// What each may publish and subscribe to.
    pub acl: Acl,
}

/// Who a rule is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// Any client that gave a known user name and password.
    AnyUser,
    /// Clients without credentials (when anonymous access is allowed).
    Anonymous,
    /// This user.
    User(String),
    /// Users of this group (users file, third field).
    Group(String),
}

/// One ACL rule: who, and the topic filters (with `%u` user name and `%c` client id) they may
/// publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Who it is for.
    pub who: Vec<Who>,
    /// Filters publishes must match.
    pub publish: Vec<String>,
    /// Filters subscriptions must stay within.
    pub subscribe: Vec<String>,
}

/// The connected client, as the ACL sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client<'a> {
    /// Its user name; `None` when anonymous.
    pub user: Option<&'a str>,
    /// Its user's groups.
    pub groups: &'a [String],
    /// Its client id.
    pub client_id: &'a str,
}

/// The ACL: `None` rules means everything is allowed.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Option<Vec<Rule>>,
}

impl Acl {
    /// An ACL of `rules`; `None`: everything is allowed.
    pub fn new(rules: Option<Vec<Rule>>) -> Acl {
        Acl { rules }
    }

    fn patterns<'r>(
        &'r self,
        client: &'r Client<'_>,
        pick: impl Fn(&'r Rule) -> &'r [String] + 'r,
    ) -> Option<impl Iterator<Item = String> + 'r> {
        let rules = self.rules.as_ref()?;
        Some(
            rules
                .iter()
                .filter(move |r| r.who.iter().any(|w| applies(w, client)))
                .flat_map(move |r| pick(r).iter())
                .filter_map(move |p| substitute(p, client)),
        )
    }

    /// Whether `client` may publish to `topic`. Pure.
    pub fn may_publish(&self, client: &Client<'_>, topic: &str) -> bool {
        match self.patterns(client, |r| &r.publish) {
            None => true,
            Some(mut patterns) => patterns.any(|p| rumqttd::protocol::matches(topic, &p)),
        }
    }

    /// Whether `client` may subscribe to `filter`: it must stay within a granted filter. Pure.
    pub fn may_subscribe(&self, client: &Client<'_>, filter: &str) -> bool {
        match self.patterns(client, |r| &r.subscribe) {
            None => true,
            Some(mut patterns) => patterns.any(|p| covers(&p, filter)),
        }
    }
}

fn applies(who: &Who, client: &Client<'_>) -> bool {
    match (who, client.user) {
        (Who::AnyUser, Some(_)) => true,
        (Who::Anonymous, None) => true,
        (Who::User(u), Some(name)) => u == name,
        (Who::Group(g), Some(_)) => client.groups.iter().any(|x| x == g),
        _ => false,
    }
}

/// A pattern with `%u` and `%c` filled in; `None` when the value would change the filter's
/// shape (it holds `/`, `+` or `#`, or is missing), so the rule does not apply. Pure.
pub fn substitute(pattern: &str, client: &Client<'_>) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['/', '+', '#']);
    // One pass over the pattern: a value is never scanned for tokens itself (a user named
    // "%c" must not become the client id).
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let token = &rest[at..];
        if let Some(after) = token.strip_prefix("%u") {
            out.push_str(client.user.filter(|u| !unsafe_value(u))?);
            rest = after;
        } else if let Some(after) = token.strip_prefix("%c") {
            if unsafe_value(client.client_id) {
                return None;
            }
            out.push_str(client.client_id);
            rest = after;
        } else {
            out.push('%');
            rest = &token[1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

/// Whether every topic `filter` matches is matched by `granted` too. Pure.
pub fn covers(granted: &str, filter: &str) -> bool {
    let g: Vec<&str> = granted.split('/').collect();
    let f: Vec<&str> = filter.split('/').collect();
    // `$` topics are matched by no leading wildcard.
    if filter.starts_with('$') && matches!(g.first(), Some(&"#") | Some(&"+")) {
        return false;
    }
    for (i, gl) in g.iter().enumerate() {
        match (*gl, f.get(i)) {
            ("#", _) => return true,
            (_, None) => return false,
            (_, Some(&"#")) => return false,
            ("+", Some(_)) => {}
            (gl, Some(&"+")) if gl != "+" => return false,
            (gl, Some(fl)) if gl != *fl => return false,
            _ => {}
        }
    }
    g.len() == f.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_cover_what_they_should() {
        for (granted, filter, want) in [
            ("sensors/#", "sensors/a/b", true),
            ("sensors/#", "sensors/#", true),
            ("sensors/+/t", "sensors/+/t", true),
            ("sensors/+/t", "sensors/a/t", true),
            ("sensors/a/t", "sensors/+/t", false),
            ("sensors/+", "sensors/#", false),
            ("#", "#", true),
            ("#", "$SYS/x", false),
            ("sensors/#", "other/x", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ] {
            assert_eq!(covers(granted, filter), want, "{granted} covers {filter}");
        }
    }

    #[test]
    fn substitution_is_one_pass_and_refuses_unsafe_values() {
        let who = |user: Option<&'static str>, id: &'static str| Client {
            user,
            groups: &[],
            client_id: id,
        };
        let cases = [
            ("p/%u/x", who(Some("s1"), "c"), Some("p/s1/x")),
            ("p/%u/%c", who(Some("s1"), "c9"), Some("p/s1/c9")),
            // A user (or certificate) named "%c" is not the client id.
            ("p/%u/#", who(Some("%c"), "victim"), Some("p/%c/#")),
            ("p/%c/#", who(Some("u"), "%u"), Some("p/%u/#")),
            ("100%/x", who(None, "c"), Some("100%/x")),
            ("p/%u", who(None, "c"), None),
            ("p/%u", who(Some("a/b"), "c"), None),
            ("p/%c", who(Some("u"), "a+"), None),
        ];
        for (pattern, client, want) in cases {
            assert_eq!(
                substitute(pattern, &client).as_deref(),
                want,
                "{pattern} for {:?}/{}",
                client.user,
                client.client_id
            );
        }
    }

    #[test]
    fn rules_apply_to_their_users_with_substitution() {
        let acl = Acl::new(Some(vec![
            Rule {
                who: vec![Who::AnyUser],
                publish: vec!["sensors/%u/#".into(), "clients/%c/#".into()],
                subscribe: vec![],
            },
            Rule {
                who: vec![Who::Group("dashboards".into())],
                publish: vec![],
                subscribe: vec!["sensors/#".into()],
            },
            Rule {
                who: vec![Who::Anonymous],
                publish: vec!["public/#".into()],
                subscribe: vec![],
            },
        ]));
        let groups = vec!["dashboards".to_owned()];
        let alice = Client {
            user: Some("alice"),
            groups: &[],
            client_id: "c1",
        };
        let grafana = Client {
            user: Some("grafana"),
            groups: &groups,
            client_id: "g",
        };
        let anon = Client {
            user: None,
            groups: &[],
            client_id: "x",
        };
        let slash = Client {
            user: Some("a/b"),
            groups: &[],
            client_id: "c/2",
        };
        for (client, topic, want) in [
            (&alice, "sensors/alice/t", true),
            (&alice, "sensors/bob/t", false),
            (&alice, "clients/c1/x", true),
            (&alice, "public/x", false),
            (&anon, "public/x", true),
            (&anon, "sensors/alice/t", false),
            (&slash, "sensors/a/b/t", false),
            (&slash, "clients/c/2/x", false),
        ] {
            assert_eq!(
                acl.may_publish(client, topic),
                want,
                "{client:?} publish {topic}"
            );
        }
        for (client, filter, want) in [
            (&grafana, "sensors/#", true),
            (&grafana, "#", false),
            (&alice, "#", false),
            (&alice, "sensors/alice/t", false),
        ] {
            assert_eq!(
                acl.may_subscribe(client, filter),
                want,
                "{client:?} subscribe {filter}"
            );
        }
        assert!(
            Acl::new(None).may_subscribe(&anon, "#"),
            "no ACL: all allowed"
        );
    }

    #[test]
    fn users_file_lines_are_checked_and_passwords_verified() {
        let hash = hash_password("s3cret").expect("hash");
        let users = Users::parse(&format!(
            "# sensors\n\nalice:{hash}\ngrafana:{hash}:dashboards, ops\n"
        ))
        .expect("parse");
        assert_eq!(users.len(), 2);
        assert_eq!(users.groups("grafana"), ["dashboards", "ops"]);
        assert!(users.verify("alice", b"s3cret"));
        assert!(users.verify("alice", b"s3cret"), "cached");
        assert!(!users.verify("alice", b"wrong"));
        assert!(!users.verify("mallory", b"s3cret"));
        for (text, line) in [
            ("alice".to_owned(), 1),
            ("alice:plaintext".to_owned(), 1),
            (format!("a:{hash}\na:{hash}"), 2),
            (format!(":{hash}"), 1),
            ("x".repeat(5000), 1),
        ] {
            let (n, reason) = Users::parse(&text).expect_err("refused");
            assert_eq!(n, line, "{reason}");
        }
    }
}
