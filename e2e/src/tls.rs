//! A small HTTPS server for the tests' own endpoints (a webhook, an aggregated API) on
//! 127.0.0.1, HTTP/1.1 only.

use std::sync::Arc;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::pki::CertPair;

/// A rustls server config for a PEM certificate and key, using the ring provider.
pub fn server_config(pair: &CertPair) -> Result<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading certificate PEM")?;
    let key = rustls_pemfile::private_key(&mut pair.key.as_bytes())
        .context("reading key PEM")?
        .context("no private key in PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over TLS on a free 127.0.0.1 port, on the caller's runtime, until the
/// runtime ends. Returns the port.
pub async fn serve(router: axum::Router, pair: &CertPair) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    serve_on(listener, router, pair)
}

/// A listener on 127.0.0.1:`port` (0: a free one) with SO_REUSEPORT, so that several
/// "replicas" can share one port and the kernel spreads connections between them.
pub fn reuseport_listener(port: u16) -> Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(socket.listen(1024)?)
}

/// Serves `router` over TLS on `listener` until the runtime ends. Returns the port.
pub fn serve_on(listener: TcpListener, router: axum::Router, pair: &CertPair) -> Result<u16> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(pair)?));
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                }
            });
        }
    });
    Ok(port)
}
