//! Stamps the git commit into the binary for `--version` and the
//! `build_info` metric. Order: RELAY_GIT_COMMIT from the build environment
//! (the Docker build, whose context has no .git, passes it as a build
//! argument), else `git rev-parse` in the source tree, else "unknown" (a
//! source tarball): the build never fails for want of git.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=RELAY_GIT_COMMIT");
    let commit = match std::env::var("RELAY_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a branch switch) and the
            // file of the branch it names (a commit). Worktrees keep HEAD in
            // their own git dir and branches in the common one.
            // A branch may also live in packed-refs.
            let common = git(&["rev-parse", "--git-common-dir"]);
            for (dir, file) in [
                (git(&["rev-parse", "--git-dir"]), Some("HEAD".to_owned())),
                (common.clone(), git(&["symbolic-ref", "-q", "HEAD"])),
                (common, Some("packed-refs".to_owned())),
            ] {
                if let (Some(dir), Some(file)) = (dir, file) {
                    let path = PathBuf::from(dir).join(file);
                    if path.exists() {
                        println!("cargo:rerun-if-changed={}", path.display());
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=RELAY_GIT_COMMIT={commit}");
}
