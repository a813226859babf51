"""SFTP version 3, pure and shared by both front doors.

- :mod:`.constants`: packet types, status codes and the one table of their
  names and texts, flags, extension names;
- :mod:`.packets`: decoded requests and replies (plain data);
- :mod:`.decode` and :mod:`.encode`: bodies to packets and back;
- :mod:`.reader`: a streaming reader (the OpenSSH tap's);
- :mod:`.attrs`: the one journal summary of attributes;
- :mod:`.policy`: what a CLOSE, a RENAME or a session's end means, and what
  is journaled;
- :mod:`.errors`: exceptions to SFTP statuses, in one place.

Nothing here does I/O or imports asyncssh.
"""
