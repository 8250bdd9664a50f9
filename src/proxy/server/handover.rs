//! Restart without a gap: the listening sockets pass from the running process to its
//! successor over a Unix socket (`SCM_RIGHTS`), as Envoy's hot restart does.
//!
//! The successor gets the *same* sockets, with their accept queues, so a connection
//! that arrives during the overlap is accepted by one process or the other and never
//! reset. (With `SO_REUSEPORT` instead, each process has a socket of its own, and the
//! connections queued on the old one's are reset when it closes it; docs/decisions.md
//! has the comparison.)
//!
//! The exchange, one line each way, then the sockets:
//! ```text
//! successor → running    acge-takeover 1
//! running   → successor  acge-sockets 1 <pid>      + 2 descriptors (proxy, admin)
//!            … the successor builds everything and starts serving them …
//! successor → running    serving
//! running   → successor  draining                  (it stops accepting and drains)
//! ```
//! A successor that fails before `serving` (a bad config, a model that does not load)
//! just exits: the running process never stopped accepting and goes on as before.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};

const HELLO: &str = "acge-takeover 1";
const SOCKETS: &str = "acge-sockets 1";

/// How long the running process waits for a successor that has its sockets to say it
/// serves them (it loads its models meanwhile).
const SUCCESSOR_START: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("takeover socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("takeover socket {path}: {reason}")]
    Protocol { path: String, reason: String },
}

impl HandoverError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn protocol(path: &Path, reason: impl Into<String>) -> Self {
        Self::Protocol {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// The sockets taken from the running process, and the line to tell it when this one
/// serves them.
pub struct Inherited {
    pub proxy: std::net::TcpListener,
    pub admin: std::net::TcpListener,
    /// The running (old) process.
    pub pid: u32,
    channel: BufReader<UnixStream>,
    path: PathBuf,
}

/// Asks the process offering its sockets at `path` for them. `None` when no process
/// offers there (the first start, or the file is stale): bind afresh.
pub fn take(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(HandoverError::io(path)(e)),
    };
    let fail = HandoverError::io(path);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(HandoverError::io(path))?;
    (&stream)
        .write_all(format!("{HELLO}\n").as_bytes())
        .map_err(HandoverError::io(path))?;
    let mut line = [0u8; 256];
    let mut fds = [-1; 2];
    let (n, received) = stream.recv_with_fd(&mut line, &mut fds).map_err(fail)?;
    // Own what arrived first, so that nothing leaks whatever the message says.
    let owned: Vec<OwnedFd> = fds[..received]
        .iter()
        // SAFETY: the kernel installed these descriptors in this process for this
        // message (SCM_RIGHTS); nothing else refers to them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    let text = String::from_utf8_lossy(&line[..n]);
    let pid = text
        .trim_end()
        .strip_prefix(SOCKETS)
        .and_then(|rest| rest.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            HandoverError::protocol(path, format!("unexpected answer `{}`", text.trim_end()))
        })?;
    let [proxy, admin]: [OwnedFd; 2] = owned.try_into().map_err(|got: Vec<OwnedFd>| {
        HandoverError::protocol(path, format!("{} sockets arrived, 2 expected", got.len()))
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(HandoverError::io(path))?;
    Ok(Some(Inherited {
        proxy: std::net::TcpListener::from(proxy),
        admin: std::net::TcpListener::from(admin),
        pid,
        channel: BufReader::new(stream),
        path: path.to_path_buf(),
    }))
}

impl Inherited {
    /// Tells the old process that this one serves the sockets: it stops accepting and
    /// drains. Returns once it has said so.
    pub fn confirm(mut self) -> Result<(), HandoverError> {
        let path = self.path.clone();
        self.channel
            .get_mut()
            .write_all(b"serving\n")
            .map_err(HandoverError::io(&path))?;
        let mut answer = String::new();
        self.channel
            .read_line(&mut answer)
            .map_err(HandoverError::io(&path))?;
        if answer.trim_end() != "draining" {
            return Err(HandoverError::protocol(
                &path,
                format!("the old process answered `{}`", answer.trim_end()),
            ));
        }
        Ok(())
    }
}

/// Offers `sockets` (proxy, then admin listener) at `path` to the next process, and
/// resolves once one of them serves them: then stop accepting and drain. A successor
/// that fails to start is logged and the offer stands.
pub async fn offer(path: PathBuf, sockets: [OwnedFd; 2]) -> Result<(), HandoverError> {
    // A file left by a process that is gone (or by the one just taken over, which
    // has let go of it) is replaced.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HandoverError::io(&path)(e)),
    }
    let listener = UnixListener::bind(&path).map_err(HandoverError::io(&path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Only this user may take the sockets over.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(HandoverError::io(&path))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(HandoverError::io(&path))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(HandoverError::io(&path))?;
    tracing::info!(path = %path.display(), "offering the listening sockets to a successor (`run --takeover`)");
    let sockets = std::sync::Arc::new(sockets);
    loop {
        let (stream, _) = listener.accept().await.map_err(HandoverError::io(&path))?;
        let stream = stream.into_std().map_err(HandoverError::io(&path))?;
        let (sockets, at) = (sockets.clone(), path.clone());
        let handed = tokio::task::spawn_blocking(move || hand_over(stream, &sockets, &at))
            .await
            .unwrap_or_else(|e| Err(HandoverError::protocol(&path, e.to_string())));
        match handed {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "a successor did not take over; serving on"),
        }
    }
}

/// One successor: send the sockets, wait for it to serve them.
fn hand_over(stream: UnixStream, sockets: &[OwnedFd; 2], path: &Path) -> Result<(), HandoverError> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
        .map_err(HandoverError::io(path))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(HandoverError::io(path))?);
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .map_err(HandoverError::io(path))?;
    if hello.trim_end() != HELLO {
        return Err(HandoverError::protocol(
            path,
            format!("unexpected greeting `{}`", hello.trim_end()),
        ));
    }
    let fds = [sockets[0].as_raw_fd(), sockets[1].as_raw_fd()];
    stream
        .send_with_fd(
            format!("{SOCKETS} {}\n", std::process::id()).as_bytes(),
            &fds,
        )
        .map_err(HandoverError::io(path))?;
    stream
        .set_read_timeout(Some(SUCCESSOR_START))
        .map_err(HandoverError::io(path))?;
    let mut serving = String::new();
    reader
        .read_line(&mut serving)
        .map_err(HandoverError::io(path))?;
    if serving.trim_end() != "serving" {
        return Err(HandoverError::protocol(
            path,
            "the successor stopped before it served (see its log)",
        ));
    }
    (&stream)
        .write_all(b"draining\n")
        .map_err(HandoverError::io(path))?;
    Ok(())
}
