//! Who runs PostgreSQL and where its files may live: PostgreSQL refuses to
//! run as root, so as root the server runs as an unprivileged account, and
//! the cluster moves where that account can reach it.

use super::cluster::create_dir;
use super::*;

/// The unprivileged account postgres runs as when this process is root.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) name: String,
    pub(super) uid: Uid,
    pub(super) gid: Gid,
}

/// `None` when not root: then postgres simply runs as the current user.
pub(super) fn unprivileged_user() -> Result<Option<RunAs>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    unprivileged_account()
        .map(Some)
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

/// The `postgres` system user, else `nobody`.
pub(super) fn unprivileged_account() -> Option<RunAs> {
    // A lookup error is treated like a missing user: try the next one.
    ["postgres", "nobody"].into_iter().find_map(|name| {
        let user = User::from_name(name).ok().flatten()?;
        Some(RunAs {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })
    })
}

/// Where the cluster lives when the service runs as root and the data
/// directory is out of the unprivileged user's reach (a checkout under
/// `/root`, say): one directory per data directory under this one.
pub(super) const FALLBACK_HOME: &str = "/var/lib/users-service";

/// `data_dir` if `user` can reach it; otherwise its directory under
/// [`FALLBACK_HOME`], so that `cargo run` works as root from anywhere.
pub(super) fn reachable_home(data_dir: PathBuf, user: &RunAs) -> Result<PathBuf, EmbeddedError> {
    match check_reachable(&data_dir, user) {
        Ok(()) => Ok(data_dir),
        Err(EmbeddedError::NotReachable { path, .. }) => {
            let home = fallback_home(&data_dir);
            warn!(
                data_dir = %data_dir.display(),
                unreachable = %path.display(),
                cluster = %home.display(),
                "the PostgreSQL user cannot reach the data directory; keeping the cluster elsewhere"
            );
            create_dir(Path::new(FALLBACK_HOME), 0o755)?;
            if create_dir(&home, 0o755)? {
                fs::set_permissions(&home, Permissions::from_mode(0o755))
                    .map_err(io_error("set permissions of", &home))?;
            }
            check_reachable(&home, user)?;
            Ok(home)
        }
        Err(other) => Err(other),
    }
}

pub(super) fn fallback_home(data_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    Path::new(FALLBACK_HOME).join(hex::encode(&digest[..8]))
}

/// Checks that `user` may search (execute bit) every directory from `/` down
/// to `dir`, which must be canonical so no symlink hides a directory.
pub(super) fn check_reachable(dir: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    for ancestor in dir.ancestors() {
        let metadata = fs::metadata(ancestor).map_err(io_error("inspect", ancestor))?;
        if !may_search(metadata.mode(), metadata.uid(), metadata.gid(), user) {
            return Err(EmbeddedError::NotReachable {
                path: ancestor.to_owned(),
                user: user.name.clone(),
            });
        }
    }
    Ok(())
}

/// The kernel applies exactly one permission class: owner bits if the user
/// owns the file, else group bits if in its group, else the other bits. Only
/// the primary group counts: std's `Command::uid` drops supplementary groups
/// (`setgroups(0)`) when started by root. ACLs are not considered.
pub(super) fn may_search(mode: u32, owner: u32, group: u32, user: &RunAs) -> bool {
    let bit = if owner == user.uid.as_raw() {
        0o100
    } else if group == user.gid.as_raw() {
        0o010
    } else {
        0o001
    };
    mode & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn an_unreachable_data_dir_gets_its_cluster_under_the_fallback_home() {
        let Some(user) = unprivileged_account() else {
            return;
        };
        let closed =
            std::env::temp_dir().join(format!("users-service-fallback-{}", std::process::id()));
        let data = closed.join("data");
        DirBuilder::new().mode(0o700).create(&closed).unwrap();
        DirBuilder::new().mode(0o755).create(&data).unwrap();
        if fs::metadata(&closed).unwrap().uid() == user.uid.as_raw() {
            fs::remove_dir_all(&closed).unwrap();
            return;
        }
        let home = reachable_home(data.clone(), &user);
        let reachable_data = reachable_home(std::env::temp_dir(), &user);
        fs::remove_dir_all(&closed).unwrap();
        let home = home.expect("a fallback home");
        let _ = fs::remove_dir(&home);
        assert_eq!(home, fallback_home(&data));
        assert!(home.starts_with(FALLBACK_HOME));
        assert_eq!(
            reachable_data.unwrap(),
            std::env::temp_dir(),
            "a reachable dir is kept"
        );
    }

    #[test]
    fn a_closed_ancestor_is_not_reachable() {
        let Some(user) = unprivileged_account() else {
            return;
        };
        // <tmp>/closed (0700, not the user's) / data (0755): closed blocks the way to data.
        let closed =
            std::env::temp_dir().join(format!("users-service-closed-{}", std::process::id()));
        let data = closed.join("data");
        DirBuilder::new().mode(0o700).create(&closed).unwrap();
        DirBuilder::new().mode(0o755).create(&data).unwrap();
        fs::set_permissions(&data, Permissions::from_mode(0o755)).unwrap();
        let owned_by_user = fs::metadata(&closed).unwrap().uid() == user.uid.as_raw();

        let result = check_reachable(&data, &user);
        let open = check_reachable(&std::env::temp_dir(), &user);
        fs::remove_dir_all(&closed).unwrap();
        assert!(open.is_ok(), "{open:?}");
        if !owned_by_user {
            assert!(
                matches!(&result, Err(EmbeddedError::NotReachable { path, .. }) if *path == closed),
                "{result:?}"
            );
        }
    }
}
