// Package tpm2 is the TPM 2.0 key store backend (stub; being implemented).
package tpm2

import (
	"context"
	"fmt"

	"github.com/gwagent/gwagent/keystore"
)

// Open opens the TPM named by u.
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	return nil, fmt.Errorf("tpm2: %w", keystore.ErrNotCompiled)
}
