#!/usr/bin/perl
# Validate the ARC chain of the message on stdin with Perl's Mail::DKIM (an
# implementation independent of dkimpy), asking the DNS server at 127.0.0.1:PORT.
# Prints the chain's result (pass, fail, none) and its detail.
use strict;
use warnings;
use Mail::DKIM::ARC::Verifier;
use Net::DNS;

my $port = shift or die "usage: arc_verify.pl DNS_PORT < message\n";
my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                       recurse => 1, udp_timeout => 5, tcp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
my $arc = Mail::DKIM::ARC::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $arc->PRINT($line);
}
$arc->CLOSE;
printf "%s %s\n", $arc->result, $arc->result_detail;
