package keystore

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"fmt"
)

// CheckDigest validates Sign's arguments before any device I/O: the digest
// must be SHA-384 (what gwagent's CSRs and TLS 1.2/1.3 with P-384 use) or
// SHA-256 (TLS peers may ask for ecdsa_secp256r1_sha256 even with a P-384
// key in TLS 1.2), and its length must match the hash.
func CheckDigest(digest []byte, opts crypto.SignerOpts) error {
	if opts == nil {
		return fmt.Errorf("%w: no hash given; sign a SHA-384 digest", ErrUnsupportedHash)
	}
	h := opts.HashFunc()
	switch h {
	case crypto.SHA384, crypto.SHA256:
	case 0:
		return fmt.Errorf("%w: cannot sign an unhashed message; sign a SHA-384 digest", ErrUnsupportedHash)
	default:
		return fmt.Errorf("%w: %v; sign a SHA-384 digest", ErrUnsupportedHash, h)
	}
	if len(digest) != h.Size() {
		return fmt.Errorf("%w: digest is %d bytes, %v needs %d", ErrUnsupportedHash, len(digest), h, h.Size())
	}
	return nil
}

// IsP384 reports whether pub is an ECDSA public key on NIST P-384.
func IsP384(pub crypto.PublicKey) bool {
	k, ok := pub.(*ecdsa.PublicKey)
	return ok && k.Curve == elliptic.P384()
}
