//! The flags of `kitepipe remote` that go to ssh unchanged: one table of
//! (ssh flag, the values given), so a new one is one field and one entry.

use std::path::PathBuf;

use clap::Args;

/// The ssh flags of `kitepipe remote` (each becomes the same ssh flag).
#[derive(Debug, Args)]
pub(super) struct SshFlags {
    /// ssh config file (`ssh -F`).
    #[arg(short = 'F', long = "ssh-config", value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// Port of the host's sshd (`ssh -p`).
    #[arg(short = 'p', long, value_name = "PORT")]
    port: Option<u16>,
    /// Login name (`ssh -l`).
    #[arg(short = 'l', long = "login", value_name = "USER")]
    login: Option<String>,
    /// Identity file (`ssh -i`).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    identity: Option<PathBuf>,
    /// An ssh option (`ssh -o`), e.g. `-o StrictHostKeyChecking=accept-new`. Repeatable.
    #[arg(short = 'o', long = "ssh-option", value_name = "OPTION")]
    ssh_option: Vec<String>,
}

impl SshFlags {
    /// The arguments for ssh: every value given, after its ssh flag.
    pub(super) fn ssh_args(&self) -> Vec<String> {
        let paths = |path: &Option<PathBuf>| -> Vec<String> {
            path.iter().map(|path| path.display().to_string()).collect()
        };
        // The table: ssh flag, and the values given for it, in the order
        // ssh gets them.
        let table: [(&str, Vec<String>); 5] = [
            ("-F", paths(&self.ssh_config)),
            ("-p", self.port.iter().map(u16::to_string).collect()),
            ("-l", self.login.iter().cloned().collect()),
            ("-i", paths(&self.identity)),
            ("-o", self.ssh_option.clone()),
        ];
        table
            .into_iter()
            .flat_map(|(flag, values)| {
                values
                    .into_iter()
                    .flat_map(move |value| [flag.to_string(), value])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flags: SshFlags,
    }

    #[test]
    fn each_flag_becomes_its_ssh_flag() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&["-F", "cfg"], &["-F", "cfg"]),
            (&["--ssh-config", "cfg"], &["-F", "cfg"]),
            (&["-p", "2222"], &["-p", "2222"]),
            (&["--login", "me"], &["-l", "me"]),
            (&["--identity", "key"], &["-i", "key"]),
            (
                &["-o", "A=1", "--ssh-option", "B=2"],
                &["-o", "A=1", "-o", "B=2"],
            ),
            (
                &[
                    "-o", "A=1", "-i", "key", "-l", "me", "-p", "22", "-F", "cfg",
                ],
                &[
                    "-F", "cfg", "-p", "22", "-l", "me", "-i", "key", "-o", "A=1",
                ],
            ),
        ];
        for (given, want) in cases {
            let cli = Cli::try_parse_from(std::iter::once("remote").chain(given.iter().copied()))
                .unwrap();
            assert_eq!(cli.flags.ssh_args(), *want, "{given:?}");
        }
        assert!(Cli::try_parse_from(["remote", "-p", "70000"]).is_err());
    }
}
