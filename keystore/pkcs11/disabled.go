//go:build !cgo || nopkcs11

// Package pkcs11 is the PKCS#11 key store backend. This build left it out:
// PKCS#11 modules are C shared libraries and need cgo.
package pkcs11

import (
	"context"
	"fmt"

	"github.com/gwagent/gwagent/keystore"
)

// Supported reports whether this build can use PKCS#11 tokens.
const Supported = false

// Open always fails: this binary was built without PKCS#11 support.
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	return nil, fmt.Errorf("pkcs11: %w: gwagent was built without PKCS#11 support (CGO_ENABLED=0 or the nopkcs11 tag); use a tpm2: or file: key, or install the full build", keystore.ErrNotCompiled)
}
