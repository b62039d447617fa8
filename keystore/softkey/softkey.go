// Package softkey is the software key store backend (stub).
package softkey

import "github.com/gwagent/gwagent/keystore"

// New returns the file-backed key store.
func New() keystore.KeyStore { return nil }
