package provisioning

import (
	"encoding/hex"
	"math/big"
)

// FormatSerial renders a certificate serial number in full: hex, two
// digits per byte as openssl and the Azure portal show it, so a leading
// zero is not dropped (big.Int.Text(16) would print 0x0a1b as "a1b").
func FormatSerial(n *big.Int) string {
	if n == nil || n.Sign() == 0 {
		return "00"
	}
	s := hex.EncodeToString(n.Bytes())
	if n.Sign() < 0 { // not allowed by RFC 5280, but say so rather than hide it
		s = "-" + s
	}
	return s
}
