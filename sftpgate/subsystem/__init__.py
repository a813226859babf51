"""Front door 2: ``sftpgate subsystem`` under OpenSSH's sshd, and the daemon side it talks to."""
