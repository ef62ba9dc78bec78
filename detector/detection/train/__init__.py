"""detection/train"""
