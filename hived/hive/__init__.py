"""The hive: a coordinator daemon and volunteer peers that train one model together."""
