// Package backends opens the key store a key URI's scheme names. It is the
// only package that knows every backend; callers (agent, provisioning, cmd)
// use it instead of importing backends one by one.
package backends

import (
	"context"
	"fmt"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/pkcs11"
	"github.com/gwagent/gwagent/keystore/softkey"
	"github.com/gwagent/gwagent/keystore/tpm2"
)

// Open opens the backend instance that holds the key u names: the TPM at
// u's device or socket, the PKCS#11 token u selects, or the file system.
// Close the store when done.
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	switch u.Scheme {
	case keystore.SchemeFile:
		return softkey.New(), nil
	case keystore.SchemeTPM2:
		return tpm2.Open(ctx, u)
	case keystore.SchemePKCS11:
		return pkcs11.Open(ctx, u)
	default:
		return nil, fmt.Errorf("%w %q", keystore.ErrUnknownScheme, u.Scheme)
	}
}
