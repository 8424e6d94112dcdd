"""swtpm's own programs (``swtpm``, ``swtpm_setup``, ``swtpm_ioctl``) answered by vtpmctl.

Management stacks (libvirt, Proxmox, Incus, mkosi) call swtpm's programs by
name with swtpm 0.7.1's options and parse their output; the modules here
accept those command lines and answer as those programs do, served by
vtpmctl's client, daemon, engine and store. ``main.py`` is the one entry
point of the launchers; it picks the program by ``argv[0]``.
"""
