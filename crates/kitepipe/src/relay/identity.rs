//! Certificate identities on the relay: the current identity state (the
//! link TLS acceptor, the verifier of connectors' certificates, the rules),
//! reloading it on request or when its files change, and enforcing a new
//! state on links that are already up (certificate identities, and names
//! held by a secret that the new rules reserve for certificates).
//!
//! A reload never drops a link that keeps its rights: a link whose
//! certificate is no longer accepted (revoked, expired, another CA) is told
//! why and closed; a link whose identity lost the right to some kites keeps
//! running, is told which kites were withdrawn and why, and stops being
//! routed to for them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kitepipe_proto::kite::KiteRef;
use kitepipe_proto::message::{self, ErrorCode, ErrorMessage, RelayMessage, Withdrawn};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::UnixTime;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use super::RelayCtx;
use super::link_identity::LinkIdentity;
use super::registry::IdentityLink;
use crate::config::IdentityConfig;
use crate::link::LinkClosed;
use crate::pki::{
    ClientAuth, ClientCa, IdentityRules, PkiError, RelayCert, RelayTlsOptions,
    client_cert_verifier, describe_relay_tls_error, relay_server_config_with,
};

/// How often the relay checks its config, client CA and revocation list
/// files for changes. Cheap (a few `stat` calls), and quick enough that a
/// `kitepipe ca revoke` takes effect within seconds.
pub(crate) const RELOAD_POLL: Duration = Duration::from_secs(2);

/// How long a refused link (refused at registration, or told on reload
/// that its certificate is no longer accepted) gets to read why and hang up
/// itself, before the relay closes it: a socket closed with unread bytes
/// sends a TCP reset, which can destroy the reason on its way.
pub(crate) const REFUSE_GRACE: Duration = Duration::from_secs(1);

/// What an identity state is built from besides its [`IdentityConfig`]; the
/// same for the life of a relay.
pub(crate) struct IdentityInputs<'a> {
    /// The relay's own certificate, for the acceptor.
    pub(crate) cert: &'a RelayCert,
    /// Whether the relay has domain secrets: then certificates are optional
    /// at the TLS layer (secret-based connectors present none); otherwise
    /// they are required.
    pub(crate) secrets: bool,
    /// The relay's config file, watched for changes.
    pub(crate) config_file: Option<&'a PathBuf>,
}

/// Everything about certificate identities that a reload replaces at once.
pub(crate) struct IdentityState {
    /// Bumped by every reload; lets a registration that raced a reload
    /// notice and check its link again.
    pub(crate) generation: u64,
    /// Accepts links with the current client CA and revocation list.
    pub(crate) acceptor: TlsAcceptor,
    /// Verifies connectors' certificates (`None`: the relay asks for none).
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// What each identity may claim.
    pub(crate) rules: IdentityRules,
    /// The settings this state was built from (a reload without a config
    /// file rereads the same files).
    config: IdentityConfig,
    /// Files whose change triggers a reload.
    watched: Vec<PathBuf>,
}

impl IdentityState {
    /// Builds the state from `config`: reads the client CA and revocation
    /// list and builds the acceptor.
    pub(crate) fn load(
        config: IdentityConfig,
        inputs: &IdentityInputs<'_>,
        generation: u64,
    ) -> Result<IdentityState, PkiError> {
        let mut watched: Vec<PathBuf> = inputs.config_file.into_iter().cloned().collect();
        let client_auth = match &config.client_ca {
            None => ClientAuth::NotRequested,
            Some(ca_path) => {
                watched.push(ca_path.clone());
                let crl = match &config.crl {
                    Some(source) => {
                        watched.push(source.path().to_path_buf());
                        source.resolve()?
                    }
                    None => None,
                };
                let client_ca = ClientCa::load(ca_path, crl)?;
                if inputs.secrets {
                    ClientAuth::Optional(client_ca)
                } else {
                    ClientAuth::Required(client_ca)
                }
            }
        };
        let verifier = client_cert_verifier(&client_auth)?;
        let server_config = relay_server_config_with(
            inputs.cert,
            &RelayTlsOptions {
                client_auth: client_auth.clone(),
            },
        )?;
        match &client_auth {
            ClientAuth::NotRequested => {}
            ClientAuth::Required(ca) | ClientAuth::Optional(ca) => {
                let mode = if matches!(client_auth, ClientAuth::Required(_)) {
                    "required"
                } else {
                    "optional (domain secrets also accepted)"
                };
                info!(
                    client_ca = %config.client_ca.as_deref().unwrap_or(std::path::Path::new("")).display(),
                    mode,
                    revocation_lists = ca.crls.len(),
                    revoked = ca.revoked.len(),
                    cert_domains = ?config.rules.cert_domains(),
                    allow_rules = config.rules.allow_rules().len(),
                    "client certificates"
                );
                if config.rules.is_empty() {
                    warn!(
                        "no cert-domain and no [[allow]] rules: certificate identities can link but claim no kite"
                    );
                }
            }
        }
        Ok(IdentityState {
            generation,
            acceptor: TlsAcceptor::from(server_config),
            verifier,
            rules: config.rules.clone(),
            config,
            watched,
        })
    }

    /// Checks a link's certificate again with the current CA and revocation
    /// list; returns why it is no longer accepted.
    fn verify(&self, identity: &LinkIdentity) -> Result<(), String> {
        let Some(verifier) = &self.verifier else {
            return Err("this relay no longer accepts client certificates".to_string());
        };
        let Some((end_entity, intermediates)) = identity.chain.split_first() else {
            return Err("no certificate on record".to_string());
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|err| describe_relay_tls_error(&err).unwrap_or_else(|| err.to_string()))
    }
}

/// Asks a running relay to reload its identity settings: the config file's
/// `client_ca`, `crl`, `cert_domain` and `[[allow]]` rules, the client CA
/// file and the revocation list. Cheap to clone; requests made while a
/// reload runs are merged into one more reload.
#[derive(Debug, Clone)]
pub struct ReloadTrigger {
    notify: Arc<Notify>,
}

impl ReloadTrigger {
    pub(crate) fn new(notify: Arc<Notify>) -> ReloadTrigger {
        ReloadTrigger { notify }
    }

    /// Requests a reload (e.g. on SIGHUP).
    pub fn reload(&self) {
        self.notify.notify_one();
    }
}

/// Reloads on request and when a watched file changes, until shutdown.
pub(crate) async fn watch(ctx: Arc<RelayCtx>, notify: Arc<Notify>) {
    let mut seen = modification_times(&ctx.identity().watched).await;
    loop {
        let why = tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = notify.notified() => "reload requested",
            _ = tokio::time::sleep(RELOAD_POLL) => {
                let now = modification_times(&ctx.identity().watched).await;
                if now == seen {
                    continue;
                }
                "a watched file changed"
            }
        };
        reload(&ctx, why);
        super::terminate::reload_certs(&ctx, why);
        // Whatever the outcome, do not retry until something changes again.
        seen = modification_times(&ctx.identity().watched).await;
    }
}

/// Rebuilds the identity state, swaps it in and enforces it on every link
/// with a certificate identity. On any error the previous state stays.
fn reload(ctx: &Arc<RelayCtx>, why: &str) {
    let previous = ctx.identity();
    let config = match &ctx.config.reload_from {
        Some(source) => match source.load() {
            Ok(config) => config,
            Err(err) => {
                error!(%why, err = %super::error_chain(&err), "reload failed; keeping the previous identity settings");
                return;
            }
        },
        None => previous.config.clone(),
    };
    let inputs = IdentityInputs {
        cert: &ctx.relay_cert,
        secrets: !ctx.config.domains.is_empty(),
        config_file: ctx.config.reload_from.as_ref().map(|source| &source.file),
    };
    let state = match IdentityState::load(config, &inputs, previous.generation + 1) {
        Ok(state) => Arc::new(state),
        Err(err) => {
            error!(%why, err = %super::error_chain(&err), "reload failed; keeping the previous identity settings");
            return;
        }
    };
    ctx.set_identity(state.clone());
    let links = ctx.registry.identity_links();
    let mut closed = 0;
    let mut withdrawn = 0;
    for link in links {
        match enforce(ctx, &state, link) {
            Enforced::Kept => {}
            Enforced::Withdrew(n) => withdrawn += n,
            Enforced::Closed => closed += 1,
        }
    }
    let reserved = rejudge_secret_grants(ctx, &state);
    info!(%why, generation = state.generation, links_closed = closed, kites_withdrawn = withdrawn, secret_grants_reserved = reserved, "identity settings reloaded");
}

/// Applies the names `state` reserves for certificate identities to what
/// links hold by a secret (after a reload added a certificate domain):
/// withdraws such kites (telling the connector) and stops routing to such
/// node names. Returns how many kites and names were taken back.
pub(crate) fn rejudge_secret_grants(ctx: &Arc<RelayCtx>, state: &IdentityState) -> usize {
    let mut taken = 0;
    for grants in ctx.registry.secret_grants() {
        if let Some(node) = &grants.node
            && let Some(why) = reserved_for_certificates(node, state, ctx)
        {
            warn!(link = grants.link, %node, %why, "node name no longer proven: the rules now reserve it");
            ctx.registry.unprove_node(grants.link);
            taken += 1;
        }
        let reserved: Vec<KiteRef> = grants
            .kites
            .into_iter()
            .filter(|kite| reserved_for_certificates(&kite.name, state, ctx).is_some())
            .collect();
        if reserved.is_empty() {
            continue;
        }
        ctx.registry.withdraw(grants.link, &reserved);
        for kite in &reserved {
            warn!(link = grants.link, kite = %kite, "kite withdrawn: the rules now reserve it for certificate identities");
        }
        taken += reserved.len();
        let withdrawn = RelayMessage::Withdrawn(message::Withdrawn {
            kites: reserved,
            message: "the relay's rules now reserve these names for certificate identities".into(),
        });
        let mux = grants.mux;
        ctx.tracker.spawn(async move {
            let _ =
                tokio::time::timeout(REFUSE_GRACE, mux.send_control(message::encode(&withdrawn)))
                    .await;
        });
    }
    taken
}

/// Why `name` (a kite name or pattern, or a node name; lowercase) is
/// reserved for certificate identities, if it is: a name under a
/// certificate domain (the default rule could grant it) or a linked
/// identity's name. Secret claims never get these.
pub(crate) fn reserved_for_certificates(
    name: &str,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Option<String> {
    let body = name.strip_prefix("*.");
    for domain in state.rules.cert_domains() {
        let domain = domain.to_ascii_lowercase();
        let under = |name: &str| name == domain || name.ends_with(&format!(".{domain}"));
        // A wildcard reaches a certificate domain's names if it is at or
        // above the domain, too.
        let above = body.is_some_and(|body| domain.ends_with(&format!(".{body}")));
        if under(body.unwrap_or(name)) || above {
            return Some(format!(
                "reserved for certificate identities (certificate domain {domain})"
            ));
        }
    }
    if ctx.registry.is_identity_name(body.unwrap_or(name)) {
        return Some("the name of a linked certificate identity".to_string());
    }
    None
}

/// Closes link `link` whose certificate is no longer accepted: stops
/// routing to it at once, tells the connector why (`unauthorized`), and
/// closes it after [`REFUSE_GRACE`]. The message goes out from a task on
/// the relay's tracker, so a stuck link cannot hold up the caller.
pub(crate) fn refuse_link(
    ctx: &Arc<RelayCtx>,
    link: super::registry::LinkId,
    mux: crate::link::Mux,
    message: String,
) {
    ctx.registry.remove_link(link);
    let token = ctx.token.clone();
    ctx.tracker.spawn(async move {
        let error = RelayMessage::Error(ErrorMessage {
            code: ErrorCode::Unauthorized,
            message: message.clone(),
        });
        let _ = tokio::time::timeout(REFUSE_GRACE, mux.send_control(message::encode(&error))).await;
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::timeout(REFUSE_GRACE, mux.closed()) => {}
        }
        mux.close(LinkClosed::Protocol(message));
    });
}

/// What [`enforce`] did to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enforced {
    /// Nothing changed.
    Kept,
    /// This many kites were withdrawn.
    Withdrew(usize),
    /// The certificate is no longer accepted: the link is being closed.
    Closed,
}

/// Applies `state` to a live link: closes it if its certificate is no
/// longer accepted, else withdraws the kites its identity may no longer
/// claim. Messages to the connector are sent by tasks on the relay's
/// tracker, so a stuck link cannot hold up a reload.
pub(crate) fn enforce(ctx: &Arc<RelayCtx>, state: &IdentityState, link: IdentityLink) -> Enforced {
    let identity = &link.identity;
    if let Err(why) = state.verify(identity) {
        let message = format!(
            "certificate {} (serial {}) is no longer accepted: {why}",
            identity.name, identity.serial
        );
        warn!(identity = %identity.name, serial = %identity.serial, link = link.link, %why, "closing link: certificate no longer accepted");
        // Stop routing to it now; the session's own cleanup follows.
        refuse_link(ctx, link.link, link.mux.clone(), message);
        return Enforced::Closed;
    }
    let forbidden: Vec<KiteRef> = link
        .kites
        .iter()
        .filter(|kite| !state.rules.allows(&identity.name, kite))
        .cloned()
        .collect();
    if forbidden.is_empty() {
        return Enforced::Kept;
    }
    ctx.registry.withdraw(link.link, &forbidden);
    for kite in &forbidden {
        warn!(identity = %identity.name, link = link.link, kite = %kite, "kite withdrawn: the rules no longer allow it");
    }
    let message = format!(
        "the relay's rules no longer let identity {} claim these kites (it may claim: {})",
        identity.name,
        state.rules.describe_grants(&identity.name)
    );
    let count = forbidden.len();
    let withdrawn = RelayMessage::Withdrawn(Withdrawn {
        kites: forbidden,
        message,
    });
    let mux = link.mux;
    ctx.tracker.spawn(async move {
        let _ =
            tokio::time::timeout(REFUSE_GRACE, mux.send_control(message::encode(&withdrawn))).await;
    });
    Enforced::Withdrew(count)
}

/// Modification times of `paths` (`None` for a missing file), to notice
/// changes by polling.
async fn modification_times(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    let mut times = Vec::with_capacity(paths.len());
    for path in paths {
        let modified = tokio::fs::metadata(path)
            .await
            .and_then(|meta| meta.modified())
            .ok();
        times.push(modified);
    }
    times
}
