//! `vm-dhcp webhook`: the admission webhooks over HTTPS.
//!
//! Certificates come from files (cert-manager; reloaded when they change), or, when no files
//! are given, are self-managed as the Go version does: a CA and a serving certificate kept
//! in the Secret `<name>-tls`, and the caBundle written into our own webhook configurations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::routing::get;
use base64::Engine as _;
use clap::Args;
use ipnet::Ipv4Net;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use vm_dhcp_webhook::Metrics;
use vm_dhcp_webhook::config::{Endpoint, webhook_configurations};

use crate::tls::{ReloadingCert, certified_key};

#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Name of the webhook: its Service, its Secret (`<name>-tls`) and its configurations.
    /// The default is the chart's for the Harvester add-on release (`<release>-webhook`).
    #[arg(
        long,
        env = "VM_DHCP_WEBHOOK_NAME",
        default_value = "harvester-vm-dhcp-controller-webhook"
    )]
    pub name: String,
    /// Namespace of the Service and the Secret.
    #[arg(long, env = "NAMESPACE", default_value = "harvester-system")]
    pub namespace: String,
    #[arg(long, env = "VM_DHCP_WEBHOOK_HTTPS_PORT", default_value_t = 8443)]
    pub https_port: u16,
    /// The cluster's Service CIDR: an IPPool overlapping it is refused.
    #[arg(
        long,
        env = "VM_DHCP_WEBHOOK_SERVICE_CIDR",
        default_value = "10.53.0.0/16"
    )]
    pub service_cidr: Ipv4Net,
    /// Serving certificate (PEM); with --tls-private-key-file. Reloaded when it changes.
    #[arg(
        long,
        env = "VM_DHCP_WEBHOOK_TLS_CERT_FILE",
        requires = "tls_private_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "VM_DHCP_WEBHOOK_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Port of the Service in the webhook configurations (the Service maps it to
    /// --https-port).
    #[arg(long, env = "VM_DHCP_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    pub service_port: i32,
    /// In self-managed mode, do not write the webhook configurations (someone else does).
    #[arg(long, env = "VM_DHCP_WEBHOOK_NO_REGISTER")]
    pub no_register: bool,
    /// Kubeconfig, one path or several separated by `:` (default: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, env = "VM_DHCP_WEBHOOK_DEBUG")]
    pub debug: bool,
    /// Largest AdmissionReview body accepted, in bytes; a larger one is answered with a 413
    /// Status naming this limit. The default holds an UPDATE of the largest object
    /// kube-apiserver stores, old and new (see vm_dhcp_webhook::limits).
    #[arg(long, env = "VM_DHCP_MAX_REQUEST_BYTES",
          default_value_t = vm_dhcp_webhook::limits::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    #[command(flatten)]
    pub serve: crate::tls::ServeArgs,
}

/// The self-managed CA and serving certificate, from the Secret or made and stored there.
async fn self_managed(
    client: &kube::Client,
    args: &WebhookArgs,
) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let secret_name = format!("{}-tls", args.name);
    let read = |s: &Secret| -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let d = s.data.as_ref()?;
        Some((
            d.get("ca.crt")?.0.clone(),
            d.get("tls.crt")?.0.clone(),
            d.get("tls.key")?.0.clone(),
        ))
    };
    if let Some(found) = secrets.get_opt(&secret_name).await?.as_ref().and_then(read) {
        return Ok(found);
    }
    let (ca, cert, key) = make_certs(&args.name, &args.namespace)?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": secret_name, "labels": {"app.kubernetes.io/name": "vm-dhcp"}},
        "type": "kubernetes.io/tls",
    }))?;
    let secret = Secret {
        data: Some(
            [("ca.crt", &ca), ("tls.crt", &cert), ("tls.key", &key)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
                .collect(),
        ),
        ..secret
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((ca, cert, key)),
        // Another replica stored its pair first: everyone serves that one.
        Err(kube::Error::Api(s)) if s.code == 409 => secrets
            .get(&secret_name)
            .await
            .ok()
            .as_ref()
            .and_then(read)
            .context("the webhook Secret exists but lacks ca.crt, tls.crt or tls.key"),
        Err(e) => {
            Err(e).with_context(|| format!("creating Secret {}/{secret_name}", args.namespace))
        }
    }
}

fn make_certs(name: &str, namespace: &str) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name}-ca"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let sans = vec![
        name.to_string(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ];
    let mut params = CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name}.{namespace}.svc"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok((
        ca.pem().into_bytes(),
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
    ))
}

async fn register(client: &kube::Client, args: &WebhookArgs, ca_pem: &[u8]) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let endpoint = Endpoint::Service {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        port: args.service_port,
    };
    let (mutating, validating) = webhook_configurations(&args.name, &endpoint, &ca);
    let pp = PatchParams::apply("vm-dhcp-webhook").force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(&args.name, &pp, &Patch::Apply(&mutating))
        .await
        .context("writing the MutatingWebhookConfiguration")?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(&args.name, &pp, &Patch::Apply(&validating))
        .await
        .context("writing the ValidatingWebhookConfiguration")?;
    Ok(())
}

pub fn run(args: WebhookArgs) -> Result<()> {
    crate::logging::init(args.debug);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: WebhookArgs) -> Result<()> {
    let client = crate::kube_client::client(args.kubeconfig.as_deref()).await?;
    let cert = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(cert), Some(key)) => ReloadingCert::watch_files(cert.clone(), key.clone())?,
        (None, None) => {
            let (ca, cert, key) = self_managed(&client, &args).await?;
            if !args.no_register {
                register(&client, &args, &ca).await?;
            }
            ReloadingCert::new(certified_key(&cert, &key)?)
        }
        _ => bail!("--tls-cert-file and --tls-private-key-file go together"),
    };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);
    let webhook = vm_dhcp_webhook::start(client, Some(args.service_cidr), metrics)
        .await
        .context("starting the IPPool cache")?;
    // Serving starts only once the cache is complete, so ready means ready.
    let readiness = crate::tls::Readiness::default();
    let limits = vm_dhcp_webhook::limits::BodyLimits::new(
        args.max_request_bytes,
        args.serve.header_read_timeout,
    );
    let router = vm_dhcp_webhook::router_with_limits(webhook, limits)
        .route("/readyz", readiness.handler())
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { crate::metrics_http::response(crate::metrics_http::encode(&registry)) }
            }),
        );
    let addr = SocketAddr::from(([0, 0, 0, 0], args.https_port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, name = %args.name, "webhook serving");
    crate::tls::serve(
        listener,
        crate::tls::server_config(cert)?,
        router,
        crate::logging::shutdown_signal(),
        &args.serve,
        readiness,
    )
    .await;
    Ok(())
}
