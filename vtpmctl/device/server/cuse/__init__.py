"""The CUSE frontend: the TPM as the character device /dev/vtpm-NAME."""
