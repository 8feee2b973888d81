"""Image-build time: ``encryptrootfs install`` (configuration, dracut enablement, units) and
the initramfs file list (``dracut-files``). Never imported at boot.

The shipped data (``dracut/50encryptrootfs``, ``systemd/``) stays at the package root, where
the dracut module's files and the unit are looked up (:func:`initramfs.package_dir`).
"""
