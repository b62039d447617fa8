//go:build cgo && !nopkcs11

// Package pkcs11 is the PKCS#11 key store backend (stub; being implemented).
package pkcs11

import (
	"context"
	"fmt"

	"github.com/gwagent/gwagent/keystore"
)

// Supported reports whether this build can use PKCS#11 tokens.
const Supported = true

// Open opens the PKCS#11 token u selects.
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	return nil, fmt.Errorf("pkcs11: %w", keystore.ErrNotCompiled)
}
