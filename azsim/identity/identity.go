// Package identity is the seam between azsim's DPS and IoT Hub halves. As in
// Azure, DPS is a client of the hub's identity registry: when it assigns a
// device it creates or updates the device identity through Registrar. The
// issuing CA (azsim's ADR-style certificate authority) is reached through
// Issuer by both DPS (first issuance) and the hub (the renewal API).
package identity

import (
	"context"
	"crypto/x509"
	"time"
)

// AuthKind is how a device authenticates to the hub.
type AuthKind string

const (
	// AuthCA: X.509 chain to the issuing CA or to a CA registered at the hub.
	AuthCA AuthKind = "certificateAuthority"
	// AuthSelfSigned: X.509 matched by SHA-256 (or SHA-1) thumbprint.
	AuthSelfSigned AuthKind = "selfSigned"
	// AuthSAS: shared access signature made with the device's symmetric key.
	AuthSAS AuthKind = "sas"
)

// Device is a device identity in the hub's registry.
type Device struct {
	ID      string
	Auth    AuthKind
	Enabled bool
	// PrimaryKey is the base64 symmetric key for AuthSAS devices.
	PrimaryKey string `json:",omitempty"`
	// Thumbprints are hex SHA-256 (or SHA-1) thumbprints for AuthSelfSigned.
	Thumbprints []string `json:",omitempty"`
	// CertificateCN, for AuthCA, is the CN of certificates DPS issues for
	// the device when it is not the device id (an individual enrollment
	// with its own device id: the CN stays the registration id).
	CertificateCN string `json:",omitempty"`
}

// Registrar is the hub's registry as DPS sees it.
type Registrar interface {
	// RegisterDevice creates the identity or updates it (DPS re-provisioning),
	// keeping the device's twin.
	RegisterDevice(ctx context.Context, d Device) error
	// HostName is the hub's address as devices dial it: the assignedHub value,
	// host:port when the port is not 8883.
	HostName() string
}

// Issuer is the operational certificate authority.
type Issuer interface {
	// Issue signs a leaf certificate for the CSR's public key with subject
	// CN = cn, valid for lifetime from a slightly back-dated notBefore, and
	// returns the chain leaf first, ending with the root.
	Issue(csr *x509.CertificateRequest, cn string, lifetime time.Duration) ([]*x509.Certificate, error)
	// IssuingCAs are the CA certificates the hub trusts for devices whose
	// certificates this issuer signed (issuing CA and root).
	IssuingCAs() []*x509.Certificate
}
